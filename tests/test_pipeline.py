"""The pipeline on the tiny kit: parity with plain diffusers, seeds, the embedding cache, options, the timeline."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from fluxdemo.errors import OptionsError
from fluxdemo.model import loading
from fluxdemo.pipeline import GenerateOptions, compare, encode, generate, initial_noise

OPTS = GenerateOptions("a cat on a red sofa", seed=42, steps=4, width=64, height=48)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_generate_shape_and_reproducible(manager):
    first = generate(manager, OPTS).images["baseline"]
    again = generate(manager, OPTS).images["baseline"]
    assert first.size == (64, 48)
    assert np.array_equal(pixels(first), pixels(again))
    other_seed = generate(manager, GenerateOptions(**{**OPTS.__dict__, "seed": 43})).images["baseline"]
    assert np.abs(pixels(first) - pixels(other_seed)).mean() > 1.0


def test_parity_with_plain_diffusers_on_dequantized_weights(manager, tiny_kit):
    """Plain FluxPipeline over the same weights, dequantized to ordinary nn.Linear layers, and the same seed."""
    plain = FluxPipeline.from_pretrained(tiny_kit, local_files_only=True)
    transformer, _ = loading.load_transformer(manager.path("transformer"), tiny_kit, torch.float32)
    t5, _ = loading.load_t5(manager.path("text_encoder_2"), tiny_kit, torch.float32)
    transformer.dequantize()
    for module in t5.modules():  # the packed T5 layers, as plain Linear layers with the same numbers
        if hasattr(module, "weight") and hasattr(module.weight, "quant_type"):
            module.weight = torch.nn.Parameter(loading._dequantized(module.weight, torch.float32), requires_grad=False)
    plain.transformer, plain.text_encoder_2 = transformer, t5
    reference = plain(
        OPTS.prompt, num_inference_steps=OPTS.steps, guidance_scale=OPTS.guidance, height=OPTS.height,
        width=OPTS.width, generator=torch.Generator("cpu").manual_seed(OPTS.seed),
    ).images[0]  # fmt: skip
    ours = generate(manager, OPTS).images["baseline"]
    # Stated tolerance: at most 1/255 per pixel (dequantize-then-matmul in GGUFLinear vs a dense matmul).
    assert np.abs(pixels(ours) - pixels(reference)).max() <= 1


def test_gguf_transformer_matches_unquantized_within_q8_error(tiny_kit, manager):
    reference = FluxPipeline.from_pretrained(tiny_kit, local_files_only=True).transformer
    ours = manager.get("transformer")
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
    )  # fmt: skip
    with torch.inference_mode():
        a, b = reference(**inputs)[0], ours(**inputs)[0]
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 1e-2  # Q8_0 rounds every block weight: not zero, but well under 1%


def test_t5_from_llama_cpp_gguf_matches_original(tiny_kit, manager):
    reference = FluxPipeline.from_pretrained(tiny_kit, local_files_only=True)
    ids = reference.tokenizer_2("a photo of a dog in the snow", return_tensors="pt").input_ids
    with torch.inference_mode():
        a = reference.text_encoder_2(ids)[0]
        b = manager.get("text_encoder_2")(ids)[0]
    assert ((a - b).norm() / a.norm()).item() < 2e-2
    packed = manager.get("text_encoder_2").encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert packed.dtype == torch.uint8  # kept packed in memory, not dequantized


def test_noise_is_the_same_numbers_diffusers_draws():
    noise = initial_noise(7, 64, 32)
    assert noise.shape == (1, (32 // 16) * (64 // 16), 64)
    raw = torch.randn((1, 16, 4, 8), generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(noise, FluxPipeline._pack_latents(raw, 1, 16, 4, 8))


def test_embedding_cache_skips_the_encoders(manager):
    generate(manager, OPTS)
    moves_before = len(manager.moves)
    result = generate(manager, OPTS)
    names = [s.name for s in result.report.timeline]
    assert "encode (cached)" in names and "encode t5" not in names
    assert all(m.component not in ("text_encoder", "text_encoder_2") for m in manager.moves[moves_before:])


def test_timeline_has_every_step_and_decode(manager):
    result = generate(manager, GenerateOptions("a fresh prompt for the timeline", steps=3, width=32, height=32))
    names = [s.name for s in result.report.timeline]
    assert [n for n in names if " step " in n] == ["baseline step 1/3", "baseline step 2/3", "baseline step 3/3"]
    assert {"encode clip", "encode t5", "decode"} <= set(names)
    assert all(s.seconds >= 0 for s in result.report.timeline)


def test_truncation_is_counted(manager):
    long_prompt = " ".join(["cat"] * 40)
    embeds = encode(manager, long_prompt, max_sequence_length=8)
    assert embeds.prompt_embeds.shape[1] == 8
    assert embeds.truncated_tokens > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 50}, "`width` must be a multiple of 16 between 16 and 2048, but is 50."),
        ({"height": 4096}, "`height` must be a multiple of 16 between 16 and 2048, but is 4096."),
        ({"steps": 0}, "`steps` must be between 1 and 100, but is 0."),
        ({"guidance": -1.0}, "`guidance` must be between 0 and 30, but is -1.0."),
        ({"seed": -5}, "`seed` must be between 0 and 4294967295, but is -5."),
        ({"prompt": "   "}, "`prompt` is empty: describe the image you want."),
        ({"max_sequence_length": 600}, "`max_sequence_length` must be between 1 and 512, but is 600."),
    ],
)
def test_options_are_validated_with_exact_messages(change, message):
    with pytest.raises(OptionsError) as e:
        GenerateOptions(**{**OPTS.__dict__, **change}).validate()
    assert str(e.value) == message


def test_compare_baseline_equals_generate_and_lora_differs(manager, kit_lora):
    result = compare(manager, OPTS, kit_lora, 1.0)
    alone = generate(manager, OPTS).images["baseline"]
    assert np.array_equal(pixels(result.images["baseline"]), pixels(alone))
    assert np.abs(pixels(result.images["lora"]) - pixels(alone)).mean() > 0.5
    with_lora = generate(manager, OPTS, kit_lora, 1.0).images["lora"]
    assert np.array_equal(pixels(result.images["lora"]), pixels(with_lora))
    assert result.report.lora.name == kit_lora


def test_the_library_judges_loras_against_the_loaded_preset(manager):
    """The tiny kit's LoRAs fit the tiny model (width 32), though not FLUX.1-dev (width 3072)."""
    entries = {e.name: e for e in manager.adapters.library.refresh()}
    samples = {"peft.safetensors", "kohya.safetensors", "comfy.safetensors", "xlabs.safetensors"}
    assert samples <= set(entries)
    assert all(entries[name].report.compatible and not entries[name].report.problems for name in samples)
