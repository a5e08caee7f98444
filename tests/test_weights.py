"""The transformer's weight format is a plan (fluxdemo.model.weights): the choice per device and memory, the flag,
and dense weights that draw GGUF's pictures."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from fluxdemo.cli import main
from fluxdemo.errors import FluxdemoError, OptionsError
from fluxdemo.model.planner import FLUX_DEV
from fluxdemo.model.presets import DEFAULT_PRESET, PRESETS
from fluxdemo.model.weights import choose, transformer_bytes

GIB = 2**30
CUDA = torch.device("cuda")
# FLUX.1-dev's components besides the transformer, as the dev preset states them (CLIP, T5 Q8_0, VAE)
SIZES = {name: source.approx_bytes for name, source in PRESETS[DEFAULT_PRESET].sources().items()}


def test_the_dense_sizes_are_flux_dev_s_parameter_counts() -> None:
    assert round(transformer_bytes("bf16", FLUX_DEV) / 1e9, 1) == 23.8
    assert round(transformer_bytes("fp8", FLUX_DEV) / 1e9, 1) == 12.0


@pytest.mark.parametrize(
    ("free", "capability", "torchao", "expected"),
    [
        (139 * GIB, (9, 0), True, "bf16: the dense transformer fits the 139.0 GiB free, and it is the fastest."),
        (16 * GIB, (8, 9), True, "fp8: bf16 does not fit the 16.0 GiB free, fp8 does, and this GPU has fp8 units."),
        (16 * GIB, (8, 9), False, "gguf: no dense format fits the 16.0 GiB free (fp8 would fit: install torchao)."),
        (24 * GIB, (8, 6), True, "gguf: no dense format fits the 24.0 GiB free."),
        (12 * GIB, (9, 0), True, "gguf: no dense format fits the 12.0 GiB free."),
    ],
)
def test_auto_takes_the_fastest_format_that_fits(free: int, capability, torchao: bool, expected: str) -> None:
    choice = choose("auto", CUDA, free, SIZES, capability=capability, has_torchao=torchao)
    fmt, _, why = expected.partition(": ")
    assert (choice.format, choice.reason) == (fmt, f"{'GGUF' if fmt == 'gguf' else fmt} weights: {why}")


def test_the_cpu_keeps_gguf_and_fp8_says_what_it_needs() -> None:
    cpu = choose("auto", torch.device("cpu"), None, SIZES)
    assert (cpu.format, cpu.reason) == (
        "gguf",
        "GGUF weights: on the CPU the file's own format is exact and needs least RAM.",
    )
    with pytest.raises(OptionsError) as e:
        choose("fp8", torch.device("cpu"), None, SIZES, has_torchao=True)
    assert str(e.value) == (
        "--weights fp8 needs a CUDA GPU of compute capability 8.9 or newer; use --weights auto, bf16 or gguf."
    )
    with pytest.raises(OptionsError) as e:
        choose("fp8", CUDA, 80 * GIB, SIZES, capability=(9, 0))
    assert str(e.value) == "--weights fp8 needs torchao (pip install torchao); use --weights auto, bf16 or gguf."


def test_dense_weights_draw_gguf_s_pictures_bit_for_bit(tiny_kit: Path, tmp_path: Path) -> None:
    """Dequantized once as GGUFLinear dequantizes every step: the same numbers, so the same PNG pixels."""
    args = ["generate", "--model", "tiny", "--prompt", "a lighthouse", "--seed", "3", "--steps", "2"]
    pixels = {}
    for fmt in ("gguf", "bf16"):
        png = tmp_path / f"{fmt}.png"
        assert main([*args, "--width", "64", "--height", "48", "--weights", fmt, "--out", str(png)]) == 0
        pixels[fmt] = hashlib.sha256(Image.open(png).tobytes()).hexdigest()
    assert pixels["gguf"] == pixels["bf16"]


def test_the_app_takes_the_format_by_flag_or_variable_and_names_a_wrong_one() -> None:
    spec = importlib.util.spec_from_file_location("app", Path(__file__).parents[1] / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.build_parser({"FLUXDEMO_WEIGHTS": "bf16"}).parse_args([]).weights == "bf16"
    assert app.build_parser({"FLUXDEMO_WEIGHTS": "bf16"}).parse_args(["--weights", "gguf"]).weights == "gguf"
    with pytest.raises(FluxdemoError) as e:
        app.check_flags(app.build_parser({"FLUXDEMO_WEIGHTS": "int4"}).parse_args([]))
    assert str(e.value) == "--weights (or FLUXDEMO_WEIGHTS) must be one of auto, gguf, bf16, fp8, but is 'int4'."
