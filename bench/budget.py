"""What one denoising step costs against its token count, for the work budget (fluxdemo/pipeline/limits.py).

A FLUX step runs the image's tokens (one per 16x16 pixels) and the prompt's 512 T5 tokens through the transformer.
This times steps at two sizes on a kit, fits seconds = fixed + per_token x image_tokens, and prints the fixed part
in image tokens: limits.STEP_FIXED_PIXELS is that figure x 256, measured on the real-width kit. With it, a unit of
work takes the same seconds at both sizes (printed), so units x seconds per unit bounds a request on the machine.

    python bench/budget.py --kind tiny-wide --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fluxdemo.model.presets import get_preset
from fluxdemo.model.tiny import ensure_kit
from fluxdemo.pipeline import GenerateOptions, Model, generate
from fluxdemo.pipeline.limits import DEFAULT_MAX_WORK, MEGAPIXEL, STEP_FIXED_PIXELS

PIXELS_PER_TOKEN = 256


def seconds(manager: Model, side: int, steps: int, seed: int) -> float:
    """One image's wall time, its prompt already encoded (the encoders are not part of a step)."""
    options = GenerateOptions("budget", seed=seed, steps=steps, width=side, height=side)
    start = time.perf_counter()
    generate(manager, options)
    return time.perf_counter() - start


def step_seconds(manager: Model, side: int, repeat: int) -> float:
    """Seconds per step at a size: (4 steps - 1 step) / 3, best of `repeat`, so load, encode and decode cancel."""
    return min((seconds(manager, side, 4, r) - seconds(manager, side, 1, r)) / 3 for r in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="tiny-wide", choices=["tiny", "tiny-wide"])
    parser.add_argument("--sizes", type=int, nargs=2, default=[16, 256])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kit = ensure_kit(args.kind)
    manager = Model(get_preset(args.kind, use_env=False), device="cpu", lora_dir=kit / "loras")
    seconds(manager, 16, 1, 0)  # loads every component and encodes the prompt once
    small, large = args.sizes
    t_small, t_large = step_seconds(manager, small, args.repeat), step_seconds(manager, large, args.repeat)
    tokens_small, tokens_large = (small * small // PIXELS_PER_TOKEN, large * large // PIXELS_PER_TOKEN)
    per_token = (t_large - t_small) / (tokens_large - tokens_small)
    fixed_tokens = t_small / per_token - tokens_small
    # With the right fixed cost, a unit of a step's work takes the same seconds at both sizes
    timed = {small: t_small, large: t_large}
    per_unit = {side: t / ((side * side + STEP_FIXED_PIXELS) / MEGAPIXEL) for side, t in timed.items()}
    row = {
        "kind": args.kind,
        "threads": args.threads,
        "step_seconds": {str(small): round(t_small, 4), str(large): round(t_large, 4)},
        "fixed_cost_in_image_tokens": round(fixed_tokens),
        "limits_STEP_FIXED_PIXELS_in_tokens": STEP_FIXED_PIXELS // PIXELS_PER_TOKEN,
        "seconds_per_unit_of_steps": {str(side): round(v, 4) for side, v in per_unit.items()},
        # what the budget promises on this machine: the heaviest admitted request's steps end within this
        "max_work_seconds_bound": round(DEFAULT_MAX_WORK * max(per_unit.values()), 1),
    }
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
