"""--compile aot (fluxdemo.lora.aot): the transformer's repeated blocks compiled ahead of time by torch.export and
AOTInductor, ZeroGPU's way (there spaces.aoti_compile makes the archive), with LoRAs hot-swapped into slots whose
tensors the compiled programs read in place. The module's fixture compiles the two block programs once, through the
ZeroGPU start-up path (zero_gpu.compile_ahead; `spaces` is absent here, so its task runs in-process): about half a
minute of C++ on a CPU, shared by every test."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_model

from fluxdemo.lora import aot
from fluxdemo.lora.compile_options import AHEAD_OF_TIME, CompileSettings
from fluxdemo.pipeline import compare
from fluxdemo.pipeline.experiments import ImageSpec, run
from fluxdemo.pipeline.options import GenerateOptions, LoraChoice
from fluxdemo.studio import zero_gpu

AOT = CompileSettings(slots=2, rank=8, backend=AHEAD_OF_TIME)
SMALL = GenerateOptions("a lighthouse at dusk", seed=7, steps=1, width=32, height=32, max_sequence_length=8)
BLOCKS = ["FluxSingleTransformerBlock", "FluxTransformerBlock"]  # the FLUX transformer's _repeated_blocks
STACKS = [
    [("peft.safetensors", 1.0)],
    [("peft.safetensors", 0.5)],
    [("comfy.safetensors", 1.0)],  # a second LoRA, of another rank, swapped in
    [("comfy.safetensors", 0.8), ("kohya.safetensors", 0.6)],  # a stack; kohya also adapts CLIP
    [("peft.safetensors", 1.5)],  # a third strength, the LoRA back from its kept weights
    [],  # the base model: every slot emptied
]


def pixels(model, stacks, options: GenerateOptions = SMALL):
    specs = [ImageSpec(f"image {i}", options, tuple(LoraChoice(n, s) for n, s in st)) for i, st in enumerate(stacks)]
    result = run(model, specs, batch=2)
    return [np.asarray(result.images[s.label]).astype(int) for s in specs], result.report


@pytest.fixture(scope="module")
def compiled(tiny_kit: Path):
    """A model compiled ahead of time for SMALL's size at start-up, as on a Space, and its first picture."""
    model = tiny_model(tiny_kit / "loras", compile=AOT)
    model.get("transformer")  # the slots, and the blocks set to run compiled programs
    zero_gpu.compile_ahead(model, SMALL)
    (first,), _ = pixels(model, [[]])
    return model, first


def test_lora_and_strength_changes_reuse_the_two_programs_and_draw_the_eager_pictures(manager, compiled) -> None:
    model, first = compiled
    ahead = model.adapters.ahead_of_time
    eager, _ = pixels(manager, [[], *STACKS])
    swapped, report = pixels(model, STACKS)
    assert ahead.compiled == 2 and sorted(name for name, _ in ahead.programs()) == BLOCKS
    # ZeroGPU's ask: the compiled pace for the size compiled at start-up, eager's for any other
    assert ahead.sizes == {(32, 32)} and zero_gpu.job_path(model, SMALL) == ("bf16", "compiled")
    assert zero_gpu.job_path(model, replace(SMALL, width=48)) == ("bf16", "eager")
    for got, want in zip([first, *swapped], eager, strict=True):
        assert np.abs(got - want).max() <= 1
    # the base model after LoRAs ran is the base model before, bit for bit: an emptied slot adds exactly 0
    assert np.array_equal(swapped[-1], first)
    assert report.model.compiled is True and report.model.weights == "bf16"
    assert report.model.compile_setup == (
        "Compiled: the transformer's repeated blocks ahead of time (torch.export + AOTInductor, once per image size), "
        "LoRAs hot-swapped into 2 slots of rank 8, so a LoRA or strength change does not recompile."
    )


def test_programs_cross_to_a_fresh_model_and_new_sizes_run_eager_when_frozen_or_full(
    manager, tiny_kit, compiled, monkeypatch
) -> None:
    """A ZeroGPU task hands the archives back as bytes; the processes it forks later run them without compiling. A
    size without a program runs eager on frozen blocks (ZeroGPU) and once MAX_PROGRAMS are compiled (anywhere)."""
    archives = compiled[0].adapters.ahead_of_time.programs()
    assert all(isinstance(archive, bytes) for archive in archives.values())
    fresh = tiny_model(tiny_kit / "loras", compile=AOT)
    fresh.get("transformer")
    ahead = fresh.adapters.ahead_of_time
    ahead.adopt(dict(archives))
    stacks, wider = [[("peft.safetensors", 0.7)], []], replace(SMALL, width=48)
    monkeypatch.setattr(aot, "MAX_PROGRAMS", len(archives))  # full: the two adopted programs
    for options, frozen in ((SMALL, False), (wider, False), (wider, True)):
        ahead.frozen = frozen
        if frozen:
            monkeypatch.undo()
        got, _ = pixels(fresh, stacks, options)
        want, _ = pixels(manager, stacks, options)
        assert [np.abs(g - w).max() <= 1 for g, w in zip(got, want, strict=True)] == [True, True]
    assert ahead.compiled == 0 and len(ahead.programs()) == 2


def test_fast_mode_wraps_the_compiled_blocks_and_skips_the_same_steps_as_eager(manager, compiled) -> None:
    """The step cache's hooks sit around the programs: a fast compare on the compiled model predicts the same steps
    for both images as on the eager one, draws its pictures, and strength 0 is the fast baseline bit for bit."""
    model, _ = compiled
    fast = replace(SMALL, steps=8, fast=True)
    for strength in (0.8, 0.0):
        got = compare(model, fast, "peft.safetensors", strength)
        want = compare(manager, fast, "peft.safetensors", strength)
        for label in ("baseline", "lora"):
            assert got.report.images[label].skipped_steps == want.report.images[label].skipped_steps == [3, 5, 7]
            assert np.abs(image(got, label) - image(want, label)).max() <= 1
    assert np.array_equal(image(got, "lora"), image(got, "baseline"))
    assert model.adapters.ahead_of_time.compiled == 2  # nothing compiled for the hooks
    assert "forward" not in vars(manager.get("transformer").transformer_blocks[0])  # eager: the class's own again


def image(result, label: str) -> np.ndarray:
    return np.asarray(result.images[label]).astype(int)
