"""What --fast buys and what it costs: a compare made exact and fast, on the real-width kit (or tiny), on any device.

    python bench/fast_speed.py [--kind tiny-wide] [--size 64] [--steps 28] [--repeat 1] [--threads 2] [--json F]

Issue 19, item 4: "fast mode / exact reported with its mean pixel difference". One compare (baseline + the kit's
first LoRA at 1.0, one image at a time) is made exact and then fast, with the same prompt embeddings (cached after a
warm-up) and the same noise, through fluxdemo.pipeline.compare; --repeat runs interleave the two. Printed: the
denoising seconds per image of each (the report's "denoise ..." stages), fast / exact, the same for the whole image
(denoise + decode), the steps fast predicted (FastSchedule.of(steps)); the median seconds of an exact step and of
fast's full and predicted steps, and the fast / exact ratio they give an image (steadier than whole runs on a shared
machine); and the mean and largest pixel difference (0-255) between each fast image and its exact twin.

The core is `fast_vs_exact(manager, options, lora)`, a function bench/gpu_speed.py can call on any model and size.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo
from fluxdemo.model.manager import default_device  # noqa: E402
from fluxdemo.model.presets import get_preset  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.pipeline import GenerateOptions, Model, Result, compare, generate  # noqa: E402
from fluxdemo.pipeline.options import FastSchedule  # noqa: E402

T5_TOKENS = {"tiny": 64, "tiny-wide": 32}  # as bench/speed.py


@dataclass(frozen=True)
class FastFigures:
    """One exact-vs-fast comparison: seconds per image (medians over the repeats) and pixel differences."""

    steps: int
    predicted: int  # steps fast predicted instead of running
    exact_denoise_s: float  # per image
    fast_denoise_s: float
    denoise_ratio: float  # fast / exact
    exact_image_s: float  # per image, denoise + decode
    fast_image_s: float
    image_ratio: float
    # Per step (medians, robust to a burst of load on a shared machine): exact, and fast's full and predicted steps;
    # step_ratio is what they make of an image, fast / exact: (run x full + predicted x predicted) / (steps x exact)
    exact_step_s: float
    full_step_s: float
    predicted_step_s: float
    step_ratio: float
    mean_pixel_diff: float  # 0-255, fast vs exact, over both images of the compare
    max_pixel_diff: int


def _steps(result: Result, predicted: bool) -> list[float]:
    """The seconds of each step of a run that was (or was not) predicted, from its report's timeline."""
    out = []
    for stage in result.report.timeline:
        label, _, step = stage.name.rpartition(" step ")
        if label in result.report.images and step:
            skipped = result.report.images[label].skipped_steps or []
            if (int(step.partition("/")[0]) in skipped) == predicted:
                out.append(stage.seconds)
    return out


def _seconds(result: Result) -> tuple[float, float]:
    """(denoising, denoising + decoding) seconds per image of a run, from its report's timeline."""
    stages = result.report.timeline
    denoise = sum(s.seconds for s in stages if s.name.startswith("denoise "))
    decode = sum(s.seconds for s in stages if s.name == "decode")
    n = len(result.images)
    return denoise / n, (denoise + decode) / n


def fast_vs_exact(manager: Model, options: GenerateOptions, lora: str | None, repeat: int = 1) -> FastFigures:
    """A compare (a generate without a LoRA) made exact and fast `repeat` times, interleaved; no results cache."""

    def made(fast: bool, steps: int = options.steps) -> Result:
        o = replace(options, fast=fast, steps=steps)
        return compare(manager, o, lora) if lora else generate(manager, o)

    made(True, steps=3)  # warm-up: loads, encodes (then cached), the first calls of both ways
    runs = {False: [], True: []}
    for _ in range(repeat):
        for fast in (False, True):
            runs[fast].append(made(fast))
    exact, fast = ([_seconds(r) for r in runs[mode]] for mode in (False, True))
    e_denoise, e_image = (statistics.median(x) for x in zip(*exact, strict=True))
    f_denoise, f_image = (statistics.median(x) for x in zip(*fast, strict=True))
    exact_step = statistics.median(s for r in runs[False] for s in _steps(r, False))
    full_step = statistics.median(s for r in runs[True] for s in _steps(r, False))
    predicted_step = statistics.median(s for r in runs[True] for s in _steps(r, True))
    predicted = len(FastSchedule.of(options.steps).predicted())
    per_image = (options.steps - predicted) * full_step + predicted * predicted_step
    diffs = [
        np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        for label, a in runs[False][0].images.items()
        for b in [runs[True][0].images[label]]
    ]
    return FastFigures(
        steps=options.steps,
        predicted=predicted,
        exact_denoise_s=e_denoise,
        fast_denoise_s=f_denoise,
        denoise_ratio=f_denoise / e_denoise,
        exact_image_s=e_image,
        fast_image_s=f_image,
        image_ratio=f_image / e_image,
        exact_step_s=exact_step,
        full_step_s=full_step,
        predicted_step_s=predicted_step,
        step_ratio=per_image / (options.steps * exact_step),
        mean_pixel_diff=float(np.mean([d.mean() for d in diffs])),
        max_pixel_diff=int(max(d.max() for d in diffs)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="tiny-wide", choices=sorted(T5_TOKENS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=28, help="FLUX.1-dev's default (the schedule scales with it)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    kit = ensure_kit(args.kind)
    manager = Model(get_preset(args.kind, use_env=False), device=default_device(), strategy="resident",
                    lora_dir=kit / "loras")  # fmt: skip
    lora = sorted(e.name for e in manager.adapters.library.refresh() if e.report and e.report.compatible)[0]
    options = GenerateOptions("a red fox in the snow", seed=1, steps=args.steps, width=args.size, height=args.size,
                              max_sequence_length=T5_TOKENS[args.kind])  # fmt: skip
    f = fast_vs_exact(manager, options, lora, args.repeat)
    print(
        f"{args.kind} on {manager.device}, {torch.get_num_threads()} threads, {args.size}x{args.size}, "
        f"{f.steps} steps "
        f"({f.predicted} predicted by fast), compare with {lora}, {args.repeat} repeat(s), medians\n"
        f"denoise per image: exact {f.exact_denoise_s:.2f} s, fast {f.fast_denoise_s:.2f} s, fast / exact "
        f"{f.denoise_ratio:.3f}\n"
        f"image (denoise + decode): exact {f.exact_image_s:.2f} s, fast {f.fast_image_s:.2f} s, fast / exact "
        f"{f.image_ratio:.3f}\n"
        f"per step (medians): exact {f.exact_step_s:.3f} s; fast: full {f.full_step_s:.3f} s, predicted "
        f"{f.predicted_step_s:.4f} s; what they make of an image, fast / exact {f.step_ratio:.3f}\n"
        f"fast vs exact pixels (0-255): mean {f.mean_pixel_diff:.2f}, max {f.max_pixel_diff}"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(asdict(f), out, indent=2)


if __name__ == "__main__":
    main()
