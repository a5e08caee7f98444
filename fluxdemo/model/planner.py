"""The memory planner: which strategy fits the execution device, and why, from sizes and formulas alone.

A pure function of numbers (free device memory, component sizes, image size, compute dtype): no device is touched,
so every decision can be unit-tested on a CPU and explained in one log line.

Where the numbers come from: the activation formulas below were fitted to allocation traces of diffusers 0.42 and
transformers 5.24 at FLUX.1-dev's real sizes, taken on the meta device (a TorchDispatchMode that adds each output
storage's bytes and subtracts them when the storage dies; scaled_dot_product_attention counted as a flash kernel, which
keeps only its output). tests/test_manager.py re-runs that trace and holds each formula to 15%.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxdemo.errors import OptionsError
from fluxdemo.model.loading import read_config
from fluxdemo.model.names import FluxDims
from fluxdemo.model.presets import PACKAGE_CONFIGS

STRATEGIES = ("resident", "model-offload", "group-offload", "disk")
# Lighter for the device: each step holds less on it at once. disk saves RAM, not device memory (its device peak is
# model-offload's), so it is never a fallback target; an out-of-memory under disk goes to group-offload.
LIGHTER = {"resident": "model-offload", "model-offload": "group-offload", "disk": "group-offload"}
VRAM_ORDER = ("resident", "model-offload", "group-offload")  # heaviest (fastest) first
_LEVEL = {"resident": 0, "model-offload": 1, "disk": 1, "group-offload": 2}  # how little each holds on the device
LARGE = ("text_encoder_2", "transformer")  # the components disk drops between stages; CLIP + VAE are 0.4 GB
STAGES = ("text_encoder", "text_encoder_2", "transformer", "vae")  # one stage per component, in pipeline order
# Where the weights wait in RAM. pinned: page-locked copies (anonymous memory), which a CUDA device reads at full
# speed and asynchronously. file-backed: the weights stay views of their files' memory maps, i.e. page cache, which
# the kernel fills on first use and may drop (and read again) when RAM is short: no copy at all.
RAM_STRATEGIES = ("pinned", "file-backed")

HEADROOM = 0.15  # a strategy fits when its predicted peak plus 15% (the estimate's stated tolerance) is free
T5_TOKENS = 512  # the pipeline always pads T5 to max_sequence_length (512 by default)
LATENT_PATCH = 16  # pixels per image token: VAE factor 8 x FLUX's 2x2 packing

# Transformer block, live activations: 14.5 x tokens x hidden x element size. Traced peaks of one double + one
# single block at width 3072 (text 512 tokens): 536 MiB at 1024x1024 bf16, 1700 MiB at 2048x2048, 388 MiB at
# 256x256 fp32; the formula plus the dequantization term below is within 7% of each, 256 to 2048 pixels.
TRANSFORMER_ACTIVATION = 14.5
# T5 encoder at 512 tokens: 24 x tokens x d_model x element size (traced: 96 MiB for T5-XXL in bf16, exactly).
T5_ACTIVATION = 24


@dataclass(frozen=True)
class Arch:
    """The sizes the formulas need, read from a diffusers-layout config folder."""

    flux: FluxDims
    t5_d_model: int
    t5_d_ff: int
    vae_channels: tuple[int, int]  # the VAE decoder's channels at full and at half resolution (128, 256 for FLUX)

    @classmethod
    def from_config_dir(cls, config_dir: Path) -> Arch:
        t5 = read_config(config_dir, "text_encoder_2")
        vae = read_config(config_dir, "vae")["block_out_channels"]
        return cls(
            FluxDims.from_config(read_config(config_dir, "transformer")), t5["d_model"], t5["d_ff"], (vae[0], vae[1])
        )

    def block_params(self) -> tuple[int, int]:
        """Parameters of one double block and of one single block (biases and norms left out: under 0.1%)."""
        h, mlp = self.flux.inner, self.flux.mlp
        per_stream = 4 * h * h + 2 * h * mlp + 6 * h * h  # q, k, v, out + MLP + AdaLayerNormZero's 6 modulations
        return 2 * per_stream, 3 * h * h + 3 * h * h + h * mlp + (h + mlp) * h  # single: norm, qkv, mlp, proj_out

    def non_block_params(self) -> int:
        """Parameters outside the blocks (embedders, final norm and projection): kept dense, in the compute dtype."""
        f, h = self.flux, self.flux.inner
        widths = f.in_channels + f.joint_attention_dim + (256 + h) * (2 if f.guidance else 1) + f.pooled_projection_dim
        return h * (widths + h + 2 * h + f.in_channels)  # + text_embedder.linear_2, norm_out, proj_out

    def largest_dequantized(self) -> int:
        """Elements of the largest quantized weight (a single block's proj_out: (hidden + mlp) x hidden)."""
        return (self.flux.inner + self.flux.mlp) * self.flux.inner


FLUX_DEV = Arch.from_config_dir(PACKAGE_CONFIGS)


@dataclass(frozen=True)
class Plan:
    """The planner's choice and the numbers behind it. Peaks are bytes allocated on the execution device."""

    strategy: str
    predicted_peak: int  # the chosen strategy's heaviest stage
    reason: str  # one line: free memory, predicted peaks, the choice
    free: int | None = None  # device memory free to us; None: the execution device is the CPU
    peaks: Mapping[str, int] = field(default_factory=dict)  # predicted peak per strategy
    stages: Mapping[str, int] = field(default_factory=dict)  # the chosen strategy's predicted peak per stage
    ram: str = "file-backed"  # one of RAM_STRATEGIES
    ram_need: int = 0  # predicted anonymous RAM the weights fill between stages, under the chosen RAM strategy


def activations(arch: Arch, width: int, height: int, dtype: torch.dtype) -> dict[str, int]:
    """Peak bytes each stage allocates beyond its weights, at width x height in the compute dtype."""
    e = dtype.itemsize
    tokens = (width // LATENT_PATCH) * (height // LATENT_PATCH) + T5_TOKENS
    # GGUFLinear dequantizes to float16 (GGUF scales are half) and casts that to the compute dtype: for a moment the
    # largest weight exists twice, 2 + e bytes per element.
    dequant = 2 + e
    c0, c1 = arch.vae_channels
    return {
        "text_encoder": 0,  # CLIP-L at 77 tokens: under 4 MiB, below this estimate's resolution
        "text_encoder_2": T5_ACTIVATION * T5_TOKENS * arch.t5_d_model * e + arch.t5_d_model * arch.t5_d_ff * dequant,
        "transformer": int(TRANSFORMER_ACTIVATION * tokens * arch.flux.inner * e)
        + arch.largest_dequantized() * dequant,
        # VAE decode at full resolution: the last up-block's upsampled input and conv output (c1 channels each) and
        # its resnet's two c0-channel tensors, or five c0-channel tensors when c0 == c1 (traced for 8...512 channels;
        # FLUX at 1024x1024 in bf16: 1536 MiB, exactly).
        "vae": width * height * e * max(2 * c0 + 2 * c1, 5 * c0),
    }


def predict(
    strategy: str,
    sizes: Mapping[str, int],
    width: int,
    height: int,
    dtype: torch.dtype,
    arch: Arch = FLUX_DEV,
    *,
    cpu: bool = False,
) -> dict[str, int]:
    """Predicted peak bytes per stage under a strategy; sizes are the components' bytes in memory.

    On an accelerator these are device bytes. With cpu=True the execution device is the RAM itself, where moves are
    no-ops: every strategy but disk holds all weights there.
    """
    if strategy not in STRATEGIES:
        raise OptionsError(f"Unknown memory strategy {strategy!r}; choose from auto, {', '.join(STRATEGIES)}.")
    act = activations(arch, width, height, dtype)
    size = {name: sizes.get(name, 0) for name in STAGES}
    small = sum(size[s] for s in STAGES if s not in LARGE)
    if strategy == "resident" or (cpu and strategy != "disk"):
        return {stage: sum(size.values()) + act[stage] for stage in STAGES}
    if cpu:  # disk on the CPU: the small components stay, a large one is there only for its own stage
        return {stage: small + (size[stage] if stage in LARGE else 0) + act[stage] for stage in STAGES}
    peaks = {stage: size[stage] + act[stage] for stage in STAGES}  # model-offload and disk: one component at a time
    if strategy == "group-offload":
        # diffusers streams one block per group and, with CUDA streams, prefetches the next: two blocks on the device
        # (the largest are double blocks), plus the dense layers outside the blocks for the whole forward.
        double, single = arch.block_params()
        non_block = arch.non_block_params() * dtype.itemsize
        blocks = max(size["transformer"] - non_block, 0)
        largest = blocks * double // (arch.flux.num_double * double + arch.flux.num_single * single)
        peaks["transformer"] = non_block + 2 * largest + act["transformer"]
    return peaks


def ram_need(
    strategy: str, sizes: Mapping[str, int], on_cpu: bool, ram: str = "pinned", mapped: Collection[str] = ()
) -> int:
    """Anonymous RAM the strategy keeps filled with weights between stages. Under "file-backed" the mapped
    components (GGUF files) count as nothing: their weights are page cache, which the kernel can always take back.
    (A mapped component's few dense tensors, such as T5's dequantized embedding, are under 5% of it: left out.)"""
    if ram not in RAM_STRATEGIES:
        raise OptionsError(f"Unknown RAM strategy {ram!r}; choose from {', '.join(RAM_STRATEGIES)}.")
    held = {n: 0 if ram == "file-backed" and n in mapped else sizes.get(n, 0) for n in STAGES}
    total = sum(held.values())
    if strategy == "disk":  # the large components live in RAM only for their stage, one at a time
        return total - sum(held[n] for n in LARGE) + max(held[n] for n in LARGE)
    if strategy == "resident" and not on_cpu:
        return max(held.values())  # RAM only while loading, one component at a time
    return total


def heavier(a: str, b: str) -> bool:
    """Whether strategy a holds more on the device than strategy b (disk holds what model-offload holds)."""
    return _LEVEL[a] < _LEVEL[b]


def plan(
    free_vram: int | None,
    sizes: Mapping[str, int],
    width: int,
    height: int,
    dtype: torch.dtype,
    *,
    ram_free: int | None = None,
    arch: Arch = FLUX_DEV,
    strategy: str = "auto",
    ceiling: str | None = None,
    mapped: Collection[str] = LARGE,
    can_pin: bool = True,
) -> Plan:
    """Choose a strategy: the heaviest (fastest) whose predicted peak fits the free device memory with HEADROOM;
    then where its weights wait in RAM: pinned copies where RAM holds them with HEADROOM, else file-backed.

    free_vram None means no figure: the execution device is the CPU (or cannot tell yet): resident, as there is
    nowhere to offload to, computing from the mapped files; disk only when even the weights that are not mapped do
    not fit in RAM. A strategy other than "auto" is kept and only explained.
    ceiling, once an out-of-memory has proven a strategy too heavy for this machine, is the heaviest allowed.
    mapped: the components whose weights stay views of their files (GGUF); can_pin: the device reads pinned RAM
    faster (CUDA).
    """
    for name in (strategy, ceiling):
        if name not in (*STRATEGIES, "auto", None):
            raise OptionsError(f"Unknown memory strategy {name!r}; choose from auto, {', '.join(STRATEGIES)}.")
    cpu = free_vram is None
    stages = {s: predict(s, sizes, width, height, dtype, arch, cpu=cpu) for s in STRATEGIES}
    peaks = {s: max(stages[s].values()) for s in STRATEGIES}

    def fits_ram(s: str, ram: str = "file-backed") -> bool:
        return ram_free is None or ram_need(s, sizes, cpu, ram, mapped) * (1 + HEADROOM) <= ram_free

    if strategy != "auto":
        chosen, why = strategy, "set by flag"
    elif cpu:
        chosen, why = ("resident", "nothing to offload to") if fits_ram("resident") else ("disk", "RAM is short")
    else:
        fitting = [s for s in VRAM_ORDER if peaks[s] * (1 + HEADROOM) <= free_vram]
        chosen = fitting[0] if fitting else VRAM_ORDER[-1]
        why = f"the heaviest that fits with {HEADROOM:.0%} headroom" if fitting else "nothing fits: the lightest"
        if chosen == "model-offload" and not fits_ram(chosen):
            chosen, why = "disk", "model-offload's device peak, and the weights do not fit in RAM together"
    if ceiling is not None and heavier(chosen, ceiling):
        chosen, why = ceiling, f"{chosen} ran out of memory earlier"
    ram, ram_why = _ram_strategy(chosen, cpu, can_pin, fits_ram(chosen, "pinned"))
    where = "no device memory figure (CPU execution: peaks in RAM)" if cpu else f"{_gib(free_vram)} free on the device"
    available = f", {_gib(ram_free)} RAM available" if ram_free is not None else ""
    shown = ", ".join(f"{s} {_gib(peaks[s])}" for s in STRATEGIES)
    need = ram_need(chosen, sizes, cpu, ram, mapped)
    reason = (
        f"memory plan at {width}x{height}: {where}{available}; predicted peaks {shown} -> {chosen} ({why}); "
        f"weights in RAM {ram} ({ram_why}), {_gib(need)} anonymous"
    )
    return Plan(chosen, peaks[chosen], reason, free_vram, peaks, stages[chosen], ram, need)


def _ram_strategy(strategy: str, cpu: bool, can_pin: bool, pinned_fits: bool) -> tuple[str, str]:
    """Pinned copies only where they buy something: a device that reads pinned RAM faster, a strategy that moves
    weights to it again and again, and RAM that holds the copies; file-backed everywhere else."""
    if cpu:
        return "file-backed", "the CPU computes from the mapped files"
    if strategy == "resident":
        return "file-backed", "read once from the files onto the device"
    if not can_pin:
        return "file-backed", "this device gains nothing from pinned memory"
    if not pinned_fits:
        return "file-backed", "pinned copies do not fit in RAM"
    return "pinned", "RAM holds pinned copies: faster transfers"


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"
