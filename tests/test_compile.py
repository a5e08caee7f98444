"""--compile (fluxdemo.lora.hotswap): the transformer's blocks compiled once, LoRAs hot-swapped into slots. Dynamo's
error_on_recompile turns any recompile after the first compile into a failure. The backend is aot_eager (the whole
tracing and graph capture, without inductor's minutes of C++ on a CPU); bench/compile_speed.py runs inductor."""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import replace
from pathlib import Path

import lora_factory as lf
import numpy as np
import pytest
import torch
from helpers import tiny_model
from lora_factory import TINY

from fluxdemo.cli import main
from fluxdemo.errors import FluxdemoError, LoraError, OptionsError
from fluxdemo.lora.compile_options import CompileSettings
from fluxdemo.lora.hotswap import dense_weights
from fluxdemo.model import placement
from fluxdemo.model.weights import WeightsChoice
from fluxdemo.pipeline.experiments import ImageSpec, run
from fluxdemo.pipeline.options import GenerateOptions, LoraChoice
from fluxdemo.studio.render import run_summary

CHEAP = CompileSettings(slots=2, rank=8, backend="aot_eager")
SMALL = GenerateOptions("a lighthouse at dusk", seed=7, steps=1, width=32, height=32, max_sequence_length=8)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from nothing: no graph of another test's model counts for or against it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pixels(model, stacks, batch: int = 1, options: GenerateOptions = SMALL):
    specs = [ImageSpec(f"image {i}", options, tuple(LoraChoice(n, s) for n, s in st)) for i, st in enumerate(stacks)]
    result = run(model, specs, batch=batch)
    return [np.asarray(result.images[s.label]).astype(int) for s in specs], result.report


def test_lora_stack_and_strength_changes_never_recompile_and_draw_the_eager_pictures(manager, tiny_kit: Path) -> None:
    loras = tiny_kit / "loras"
    stacks = [
        [("peft.safetensors", 1.0)],
        [("peft.safetensors", 0.5)],
        [("comfy.safetensors", 1.0)],  # a second LoRA, of another rank, swapped in
        [("comfy.safetensors", 0.8), ("kohya.safetensors", 0.6)],  # a stack; kohya also adapts CLIP
        [("peft.safetensors", 1.5)],  # a third strength, the LoRA back from its kept weights, not the file
        [],  # the base model, every slot at 0, now holding LoRAs
    ]
    eager, _ = pixels(manager, [[], *stacks])  # the session's eager model
    compiled = tiny_model(loras, compile=CHEAP)
    (first,), _ = pixels(compiled, [[]])  # compiles the two block graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        swapped, report = pixels(compiled, stacks, batch=2)
    for got, want in zip([first, *swapped], eager, strict=True):
        assert np.abs(got - want).max() <= 1
    # the base model with LoRAs held at strength 0 is the base model with empty slots, bit for bit
    assert np.array_equal(swapped[-1], first)
    # compiled, images go one by one even with batch=2: a mixed batch (adapter names per sample) is another graph
    assert report.batches == [[f"image {i}"] for i in range(len(stacks))]
    assert report.model.compiled is True and report.model.weights == "bf16"
    assert report.model.compile_setup == (
        "Compiled: the transformer's repeated blocks (torch.compile, aot_eager), LoRAs hot-swapped into 2 slots of "
        "rank 8, so a LoRA or strength change does not recompile."
    )
    assert report.model.compile_setup in run_summary(report)


def test_real_width_compiled_draws_the_eager_pictures(tiny_wide_kit: Path) -> None:
    """One LoRA image (the base model's path included) at the real width; eager on dense weights, GGUF's pictures."""
    options = GenerateOptions("a red fox", seed=3, steps=1, width=16, height=16, max_sequence_length=8)
    stack, loras = [[("peft.safetensors", 1.0)]], tiny_wide_kit / "loras"
    (eager,), _ = pixels(tiny_model(loras, "tiny-wide", weights="bf16"), stack, options=options)
    (compiled,), _ = pixels(tiny_model(loras, "tiny-wide", compile=CHEAP), stack, options=options)
    assert np.abs(compiled - eager).max() <= 1


def test_what_compiled_slots_cannot_hold_is_refused_with_a_sentence(tiny_kit: Path, tmp_path: Path) -> None:
    lokr = lf.lokr((TINY.inner, TINY.inner), (2, 2), 2, None, torch.Generator().manual_seed(5))
    lf.save(
        tmp_path / "lokr.safetensors", {f"lycoris_transformer_blocks_0_attn_to_out_0.{r}": t for r, t in lokr.items()}
    )
    shutil.copy(tiny_kit / "loras" / "peft.safetensors", tmp_path)
    shutil.copy(tiny_kit / "loras" / "comfy.safetensors", tmp_path)
    model = tiny_model(tmp_path, compile=CompileSettings(slots=1, rank=2, backend="aot_eager"))
    with pytest.raises(LoraError) as e:
        pixels(model, [[("lokr.safetensors", 1.0)]])
    assert str(e.value) == (
        "lokr.safetensors is a LoKr/LoHa, which cannot be hot-swapped into the compiled transformer: start without "
        "--compile to use it."
    )
    with pytest.raises(OptionsError) as e:
        pixels(model, [[("peft.safetensors", 1.0), ("comfy.safetensors", 1.0)]])
    assert str(e.value) == (
        "With --compile a stack holds at most 1 LoRAs (the compiled slots), but this one has 2: restart with "
        "--compile-slots 2, or without --compile."
    )
    with pytest.raises(LoraError) as e:
        pixels(model, [[("peft.safetensors", 1.0)]])
    assert str(e.value) == (
        "peft.safetensors has rank 4, more than the compiled slots' rank 2: restart with --compile-rank 4 (or more), "
        "or without --compile."
    )
    with pytest.raises(OptionsError) as e:
        pixels(tiny_model(tmp_path, compile=CHEAP, strategy="disk"), [[]])
    assert str(e.value) == (
        "--compile works with the resident and model-offload memory strategies, not disk: start without --compile, "
        "or with --strategy resident or model-offload if the model fits."
    )


def test_compile_needs_dense_weights() -> None:
    gguf = WeightsChoice("gguf", "GGUF weights: ...")
    assert dense_weights(gguf, "auto", "cpu").format == "bf16"  # dense on the CPU draws GGUF's pictures
    assert dense_weights(WeightsChoice("fp8", "..."), "auto", "cuda").format == "fp8"
    for requested, why in (("gguf", "--weights gguf was asked"), ("auto", "only GGUF fits this device's free memory")):
        with pytest.raises(OptionsError) as e:
            dense_weights(gguf, requested, "cuda")
        assert str(e.value) == f"--compile needs dense weights (bf16 or fp8), but {why}: start without --compile."


def test_the_flag_and_the_variable(tiny_kit: Path, tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("app", Path(__file__).parents[1] / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.build_parser({}).parse_args([]).compile == "off"
    env = {"FLUXDEMO_COMPILE": "on", "FLUXDEMO_COMPILE_RANK": "32"}
    args = app.build_parser(env).parse_args(["--compile-slots", "3"])
    assert (args.compile, args.compile_rank, args.compile_slots) == ("on", 32, 3)
    assert app.build_parser(env).parse_args(["--compile", "off"]).compile == "off"
    with pytest.raises(FluxdemoError) as e:
        app.check_flags(app.build_parser({"FLUXDEMO_COMPILE": "yes"}).parse_args([]))
    assert str(e.value) == "--compile (or FLUXDEMO_COMPILE) must be on, off or aot, but is 'yes'."
    assert app.build_parser({"FLUXDEMO_COMPILE": "aot"}).parse_args([]).compile == "aot"
    # The CLI: a stack over the slots is refused before anything loads
    argv = ["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "1", "--width", "16", "--height", "16"]
    loras = ["--lora", "peft.safetensors+comfy.safetensors", "--out", str(tmp_path / "x.png")]
    assert main([*argv, *loras, "--compile", "--compile-slots", "1"]) == 2
    assert "With --compile a stack holds at most 1 LoRAs" in capsys.readouterr().err


def test_fast_on_a_compiled_model_is_a_sentence(tiny_kit: Path) -> None:
    """diffusers' TaylorSeer hooks sit inside the blocks torch.compile compiled whole (fullgraph)."""
    model = tiny_model(tiny_kit / "loras", compile=CHEAP)
    fast = GenerateOptions(
        "a lighthouse at dusk", seed=7, steps=4, width=32, height=32, max_sequence_length=8, fast=True
    )
    with pytest.raises(OptionsError) as e:
        pixels(model, [[]], options=fast)
    assert str(e.value) == (
        "Fast mode does not work with torch.compile: untick Fast, or start with --compile aot (or without it)."
    )
    assert not model.loaded()  # refused before anything was loaded or compiled


def test_under_model_offload_a_lora_swapped_in_on_the_device_survives_the_trip_to_ram(
    manager, tiny_kit: Path, monkeypatch
) -> None:
    """model-offload copies RAM to the device before a request and puts the RAM copy back after it, so a LoRA swapped
    into a slot on the device is gone by the next request. On the CPU the copy to the device is the same tensor,
    which would hide that: here it is a real copy, as on a GPU."""
    copy_in = placement.onload

    def real_copy(state, device, *, keep: bool, pin: bool) -> None:
        copy_in(state, device, keep=keep, pin=pin)
        for _, tensor in placement.tensors(state.module):
            tensor.data = tensor.data.clone()

    monkeypatch.setattr(placement, "onload", real_copy)
    model = tiny_model(tiny_kit / "loras", compile=CHEAP, strategy="model-offload")
    stacks = [[("peft.safetensors", 1.0)], [("peft.safetensors", 1.0)], [("peft.safetensors", 0.5)]]
    for seed, stack in enumerate(stacks):  # one request each: the second finds peft "in its slot" already
        options = replace(SMALL, seed=seed)
        (got,), _ = pixels(model, [stack], options=options)
        (want,), _ = pixels(manager, [stack], options=options)
        assert np.abs(got - want).max() <= 1
