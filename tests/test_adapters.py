"""LoRAs on the live model: switching, strength, eviction and text-encoder LoRAs, never touching the base weights."""

import numpy as np
import pytest
from helpers import tiny_model
from hostile import base_weights_hash

from fluxdemo.pipeline import GenerateOptions, Model, compare, generate

OPTS = GenerateOptions("a red fox in the snow", seed=3, steps=3, width=32, height=32)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture
def fresh(tiny_kit) -> Model:
    """A manager of its own, so what a test loads and evicts is the whole story."""
    return tiny_model(tiny_kit / "loras")


def test_a_b_a_equals_a_alone(fresh, tiny_kit):
    a_first = generate(fresh, OPTS, "peft.safetensors", 0.8).images["lora"]
    generate(fresh, OPTS, "comfy.safetensors", 1.2)
    a_again = generate(fresh, OPTS, "peft.safetensors", 0.8).images["lora"]
    only_a = tiny_model(tiny_kit / "loras")
    a_alone = generate(only_a, OPTS, "peft.safetensors", 0.8).images["lora"]
    assert np.array_equal(pixels(a_first), pixels(a_again))
    assert np.array_equal(pixels(a_again), pixels(a_alone))
    assert [loaded.name for loaded in fresh.adapters.loaded()] == ["comfy.safetensors", "peft.safetensors"]


def test_strength_zero_is_the_base_model_bit_for_bit(fresh):
    baseline = generate(fresh, OPTS).images["baseline"]
    for lora in ("peft.safetensors", "kohya.safetensors", "xlabs.safetensors"):
        at_zero = generate(fresh, OPTS, lora, 0.0).images["lora"]
        assert np.array_equal(pixels(at_zero), pixels(baseline)), lora


def test_strength_is_set_in_place_and_changes_the_image(fresh):
    half = generate(fresh, OPTS, "peft.safetensors", 0.5).images["lora"]
    full = generate(fresh, OPTS, "peft.safetensors", 1.0).images["lora"]
    half_again = generate(fresh, OPTS, "peft.safetensors", 0.5).images["lora"]
    assert np.abs(pixels(half) - pixels(full)).mean() > 0.1
    assert np.array_equal(pixels(half), pixels(half_again))
    loads = [s for s in fresh.timeline.stages if s.name == "load LoRA"]
    assert loads == []  # the last run loaded nothing: the adapter stayed, only its weight changed


def test_switching_never_reloads_the_base_model_or_changes_its_weights(fresh):
    generate(fresh, OPTS)
    transformer = fresh.get("transformer")
    before = base_weights_hash(transformer)
    fresh.adapters.max_loaded = 2
    for lora, strength in [("peft.safetensors", 1.0), ("kohya.safetensors", 0.5), ("comfy.safetensors", 2.0),
                           ("peft.safetensors", 0.3), ("xlabs.safetensors", 1.0)]:  # fmt: skip
        result = generate(fresh, OPTS, lora, strength)
        assert not any(s.name == "load transformer" for s in result.report.timeline)
    assert fresh.get("transformer") is transformer
    assert [loaded.name for loaded in fresh.adapters.loaded()] == ["peft.safetensors", "xlabs.safetensors"]
    adapters = set(transformer.peft_config)  # evicted adapters are gone from the model, not just from our list
    assert adapters == {loaded.adapter for loaded in fresh.adapters.loaded()}
    assert base_weights_hash(transformer) == before


def test_a_text_encoder_lora_encodes_the_prompt_twice(fresh):
    result = compare(fresh, GenerateOptions("a kohya prompt", seed=1, steps=2, width=32, height=32),
                     "kohya.safetensors")  # fmt: skip
    names = [s.name for s in result.report.timeline]
    assert result.report.text_encoder_lora is True
    assert names.count("encode clip") == 2  # without and with the CLIP-L part of the LoRA
    plain = compare(fresh, GenerateOptions("a peft prompt", seed=1, steps=2, width=32, height=32), "peft.safetensors")
    assert result.report.lora.text_encoder and not plain.report.text_encoder_lora
    assert [s.name for s in plain.report.timeline].count("encode clip") == 1
