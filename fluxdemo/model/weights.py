"""The transformer's weight format is a plan: dense bf16 where it fits, fp8 where it fits and the GPU has fp8 units,
GGUF (as the file stores it) where nothing else fits, and always on the CPU.

Weight-only formats save memory, not time: FLUX.1-dev at 1024x1024 is compute-bound, and GGUF dequantizes every layer
every step (~1.25x bf16's time for Q8_0 on an H100). So the fastest format that fits wins; GGUF stays exact and the
default where memory is the constraint. The choice is a pure function of numbers, testable on a CPU.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from fluxdemo.errors import OptionsError
from fluxdemo.model import memory, planner
from fluxdemo.model.loading import LoadSummary, module_bytes

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("auto", "gguf", "bf16", "fp8")
FP8_CAPABILITY = (8, 9)  # Ada and Hopper onwards have fp8 tensor cores


@dataclass(frozen=True)
class WeightsChoice:
    """The transformer's weight format and why, in one sentence (named in the report and the run panel)."""

    format: str  # gguf, bf16 or fp8
    reason: str


def fp8_available() -> bool:
    """Whether torchao (an optional extra: it is only needed for fp8) is installed."""
    return importlib.util.find_spec("torchao") is not None


def transformer_bytes(fmt: str, arch: planner.Arch) -> int:
    """The transformer's bytes in memory in a dense format: its blocks at 2 (bf16) or 1 (fp8) byte per weight, the
    layers outside the blocks in bf16 (torchao leaves them; they are 2% of the model)."""
    double, single = arch.block_params()
    blocks = arch.flux.num_double * double + arch.flux.num_single * single
    return blocks * (1 if fmt == "fp8" else 2) + arch.non_block_params() * 2


def choose_here(requested: str, device: torch.device, sizes: Mapping[str, int]) -> WeightsChoice:
    """The choice for this machine: its device's free memory and compute capability, and whether torchao is here."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    free = memory.free_device_memory(device)
    choice = choose(requested, device, free, sizes, capability=capability, has_torchao=fp8_available())
    logger.info(choice.reason)
    return choice


def choose(
    requested: str,
    device: torch.device,
    free_vram: int | None,
    sizes: Mapping[str, int],
    *,
    capability: tuple[int, int] | None = None,
    has_torchao: bool = False,
    arch: planner.Arch = planner.FLUX_DEV,
    size: tuple[int, int] = (1024, 1024),
) -> WeightsChoice:
    """The format for `requested` (auto or one of WEIGHT_FORMATS): auto takes bf16 if the transformer stage fits the
    free device memory dense (with the planner's headroom), then fp8 on a GPU with fp8 units and torchao, else GGUF."""
    if requested not in WEIGHT_FORMATS:
        raise OptionsError(f"Unknown weight format {requested!r}; choose from {', '.join(WEIGHT_FORMATS)}.")
    fp8_units = device.type == "cuda" and capability is not None and capability >= FP8_CAPABILITY
    if requested == "fp8" and not (fp8_units and has_torchao):
        need = "torchao (pip install torchao)" if fp8_units else "a CUDA GPU of compute capability 8.9 or newer"
        raise OptionsError(f"--weights fp8 needs {need}; use --weights auto, bf16 or gguf.")
    if requested != "auto":  # on the CPU "bf16" is dense in the compute dtype (float32 there)
        return WeightsChoice(requested, f"{requested} weights: set by --weights.")
    if device.type == "cpu":
        return WeightsChoice("gguf", "GGUF weights: on the CPU the file's own format is exact and needs least RAM.")
    if free_vram is None:
        return WeightsChoice("gguf", "GGUF weights: the device's free memory is unknown, and GGUF needs the least.")
    fits = {fmt: _fits(fmt, free_vram, sizes, arch, size) for fmt in ("bf16", "fp8")}
    gib = f"{free_vram / 2**30:.1f} GiB free"
    if fits["bf16"]:
        return WeightsChoice("bf16", f"bf16 weights: the dense transformer fits the {gib}, and it is the fastest.")
    if fits["fp8"] and fp8_units and has_torchao:
        return WeightsChoice("fp8", f"fp8 weights: bf16 does not fit the {gib}, fp8 does, and this GPU has fp8 units.")
    lacking = "" if not fits["fp8"] else (" (fp8 would fit: install torchao)" if fp8_units else "")
    return WeightsChoice("gguf", f"GGUF weights: no dense format fits the {gib}{lacking}.")


def _fits(fmt: str, free: int, sizes: Mapping[str, int], arch: planner.Arch, size: tuple[int, int]) -> bool:
    """Whether the transformer stage fits the device with the transformer dense, one component at a time."""
    dense = {**sizes, "transformer": transformer_bytes(fmt, arch)}
    peaks = planner.predict("model-offload", dense, *size, torch.bfloat16, arch)
    return peaks["transformer"] * (1 + planner.HEADROOM) <= free


def apply(model: torch.nn.Module, summary: LoadSummary, fmt: str) -> tuple[torch.nn.Module, LoadSummary]:
    """The GGUF-loaded transformer in the chosen format. bf16: each packed weight dequantized once, as GGUFLinear does
    every step (to float16, then the compute dtype), so the pictures are GGUF's. fp8: that, then torchao's float8
    dynamic-activation quantization of the linear layers (fp8 matmuls on the GPU's fp8 units)."""
    if fmt == "gguf" or summary.component != "transformer":
        return model, summary
    model = model.dequantize() or model  # diffusers' GGUF dequantize restores nn.Linear layers in place
    if fmt == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig())
    return model, replace(summary, quant=fmt, bytes=module_bytes(model))
