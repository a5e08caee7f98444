"""What --compile buys per step, and what the first compile costs: compiled / eager seconds per step, with and without
a LoRA, on the real-width kit (or tiny), on whatever device; one run.

    python bench/compile_speed.py [--kind tiny-wide] [--size 128] [--steps 3] [--backend inductor] [--json]

Both ways run the same dense weights (--compile needs them; on the CPU they draw GGUF's pictures) through
fluxdemo.pipeline.experiments.run, so the figures are the product's. Eager: the LoRA as its own PEFT adapter.
Compiled: the transformer's repeated blocks compiled once (fluxdemo.lora.hotswap), the LoRA hot-swapped into a slot
of rank --rank (padded), every slot computed at every step. Seconds per step are medians of the timeline's step
stages after the first compiled image; the compile's seconds are the first compiled image's denoising minus a later
one's. Also printed: the largest pixel difference (0-255) between the compiled and eager pictures.

`measure()` is the core, for bench/gpu_speed.py to import.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo
from fluxdemo.lora.compile_options import DEFAULT_RANK, DEFAULT_SLOTS, CompileSettings  # noqa: E402
from fluxdemo.model.presets import get_preset  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.pipeline import GenerateOptions, Model  # noqa: E402
from fluxdemo.pipeline.experiments import ImageSpec, run  # noqa: E402
from fluxdemo.pipeline.options import LoraChoice  # noqa: E402

T5_TOKENS = {"tiny": 64, "tiny-wide": 32}  # as bench/speed.py


@dataclass(frozen=True)
class CompileSpeed:
    """Seconds per step each way (medians), the first compile's seconds, and how far the pictures differ."""

    kind: str
    device: str
    size: int
    steps: int
    backend: str
    eager_step: float  # the base model
    eager_lora_step: float
    compiled_step: float
    compiled_lora_step: float
    compile_seconds: float
    max_pixel_difference: int  # compiled vs eager, base and LoRA images, 0-255

    @property
    def ratio(self) -> float:
        return self.compiled_step / self.eager_step

    @property
    def lora_ratio(self) -> float:
        return self.compiled_lora_step / self.eager_lora_step


def _images(model: Model, options: GenerateOptions, stacks: list[tuple]) -> list[tuple]:
    """(pixels, step seconds, denoise seconds) per stack, each its own run (no cache)."""
    out = []
    for stack in stacks:
        result = run(model, [ImageSpec("image", options, stack)])
        timeline = result.report.timeline
        steps = [s.seconds for s in timeline if s.name.startswith("image step ")]
        denoise = sum(s.seconds for s in timeline if s.name == "denoise image")
        out.append((np.asarray(result.images["image"]).astype(int), steps, denoise))
    return out


def measure(
    kind: str = "tiny-wide",
    size: int = 128,
    steps: int = 3,
    backend: str = "inductor",
    lora: str = "peft.safetensors",
    slots: int = DEFAULT_SLOTS,
    rank: int = DEFAULT_RANK,
    device: str | None = None,
) -> CompileSpeed:
    """One run of each way on a kit preset (built if missing), the eager model freed before the compiled one loads."""
    kit = ensure_kit(kind)
    options = GenerateOptions("a lighthouse at dusk", 3, steps, 3.5, size, size, T5_TOKENS.get(kind, 64))
    stacks = [(), (LoraChoice(lora, 1.0),)]
    preset = get_preset(kind, use_env=False)
    where = {"device": device} if device else {}
    eager = Model(preset, weights="bf16", lora_dir=kit / "loras", **where)
    plain, with_lora = _images(eager, options, [*stacks, *stacks])[2:]  # the first two warm up
    del eager
    gc.collect()
    compiled = Model(preset, lora_dir=kit / "loras", compile=CompileSettings(slots, rank, backend), **where)
    first, base, swapped = _images(compiled, options, [(), (), stacks[1]])
    return CompileSpeed(
        kind=kind,
        device=str(compiled.device),
        size=size,
        steps=steps,
        backend=backend,
        eager_step=statistics.median(plain[1]),
        eager_lora_step=statistics.median(with_lora[1]),
        compiled_step=statistics.median(base[1]),
        compiled_lora_step=statistics.median(swapped[1]),
        compile_seconds=first[2] - base[2],
        max_pixel_difference=int(max(np.abs(base[0] - plain[0]).max(), np.abs(swapped[0] - with_lora[0]).max())),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="tiny-wide", choices=("tiny", "tiny-wide"))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--slots", type=int, default=DEFAULT_SLOTS)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    a = p.parse_args()
    r = measure(a.kind, a.size, a.steps, a.backend, slots=a.slots, rank=a.rank, device=a.device)
    if a.json:
        print(json.dumps({**asdict(r), "ratio": r.ratio, "lora_ratio": r.lora_ratio}))
        return
    setup = f"backend {r.backend}, {a.slots} slots of rank {a.rank}"
    print(f"{r.kind} {r.size}x{r.size}, {r.steps} steps on {r.device}, {setup}")
    print(f"  base model: eager {r.eager_step:.3f} s/step, compiled {r.compiled_step:.3f}: {r.ratio:.2f}x")
    lora = f"eager {r.eager_lora_step:.3f} s/step, compiled {r.compiled_lora_step:.3f}"
    print(f"  with a LoRA: {lora}: {r.lora_ratio:.2f}x")
    print(f"  first compile {r.compile_seconds:.1f} s; largest pixel difference, compiled vs eager: ", end="")
    print(r.max_pixel_difference)


if __name__ == "__main__":
    main()
