"""Does batching cells through the transformer pay? Measured on the real-width kit (or tiny), on whatever device.

    python bench/batching.py [--kind tiny-wide] [--sizes 128 256] [--batch 2 4] [--repeat 3] [--threads 1]

Issue 9: "Where it pays, cells go through the transformer together as one batch (PEFT can run different adapters per
sample); keep batching only if the benchmark shows it faster and the pixels stay within 1/255 of the unbatched run."

Two kinds of batch, each against the same cells made one at a time by fluxdemo.pipeline.stages.denoise (what
experiments.run does with batch=1), from the same prompt embeddings and initial noise, and decoded by the same
fluxdemo.pipeline.stages.decode:

* seeds: one stack (LoRA A at 1.0), B seeds in one transformer pass per step (stages.denoise given the
  batch: latents [B, tokens, 64], the embeddings repeated B times);
* adapters: one seed, the base model and LoRAs in one call, each sample with its own PEFT adapter
  (fluxdemo.lora.Adapters.per_sample, PEFT's mixed-batch inference, which fluxdemo.pipeline.experiments uses with
  batch > 1): [base, A] is a compare, [base, A, B] a grid column.

Printed per size and batch: denoising seconds one at a time and batched (medians of --repeat, interleaved),
batched / one at a time, the largest pixel difference of the decoded images (0-255) and of the latents between
the two ways, and (a sanity check) how far the cells differ from the first one.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo
from fluxdemo.model.manager import default_device  # noqa: E402
from fluxdemo.model.presets import get_preset  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.pipeline import (
    GenerateOptions,  # noqa: E402
    Model,  # noqa: E402
)
from fluxdemo.pipeline.stages import Controls, decode, denoise, encode, initial_noise  # noqa: E402

T5_TOKENS = {"tiny": 64, "tiny-wide": 32}  # as bench/speed.py
STEPS = {"tiny": 4, "tiny-wide": 2}


def one_at_a_time(manager, transformer, embeddings, cells, options) -> list[torch.Tensor]:
    """fluxdemo's way: per cell, activate its stack, then denoise it alone. cells: (seed, stack) pairs."""
    latents = []
    for seed, stack in cells:
        manager.adapters.activate(stack, ("transformer",))
        noise = initial_noise(seed, options.width, options.height)
        latents.append(denoise(manager, transformer, embeddings, noise, options, "cell", Controls()))
    return latents


def batched(manager, transformer, embeddings, cells, options, mixed=False) -> list[torch.Tensor]:
    """Every cell in one pass per step (stages.denoise given a batch). Same stack for all (the first cell's
    stack active), or (mixed) one adapter per sample, as fluxdemo.pipeline.experiments does (Adapters.per_sample)."""
    if not mixed:
        manager.adapters.activate(cells[0][1], ("transformer",))
    noises = [initial_noise(seed, options.width, options.height) for seed, _ in cells]
    with manager.adapters.per_sample([stack for _, stack in cells]) if mixed else nullcontext():
        latents = denoise(manager, transformer, [embeddings] * len(cells), noises, options, "batch", Controls())
    return [latents[i : i + 1] for i in range(len(cells))]


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def measure(manager, transformer, embeddings, options, cells, mixed, repeat) -> dict:
    alone_s, batch_s = [], []
    for _ in range(repeat):  # interleaved, so a burst of load on the shared machine hits both alike
        start = time.perf_counter()
        alone = one_at_a_time(manager, transformer, embeddings, cells, options)
        alone_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        together = batched(manager, transformer, embeddings, cells, options, mixed)
        batch_s.append(time.perf_counter() - start)
    manager.adapters.deactivate()
    images_alone = decode(manager, alone, [options] * len(cells))
    images_batch = decode(manager, together, [options] * len(cells))
    pixel_diff = max(int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(images_alone, images_batch, strict=True))
    latent_diff = max(float((a - b).abs().max()) for a, b in zip(alone, together, strict=True))
    # How far apart the cells themselves are (a LoRA that did nothing would make the adapter case trivially equal).
    cell_spread = max(int(np.abs(pixels(images_alone[0]) - pixels(b)).max()) for b in images_alone[1:])
    one, many = statistics.median(alone_s), statistics.median(batch_s)
    return {"alone_s": one, "batched_s": many, "batched_over_alone": many / one, "max_pixel_diff": pixel_diff,
            "max_latent_diff": latent_diff, "cells_differ_by": cell_spread}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="tiny-wide", choices=sorted(T5_TOKENS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    kit = ensure_kit(args.kind)
    manager = Model(get_preset(args.kind, use_env=False), device=default_device(), strategy="resident",
                           lora_dir=kit / "loras")  # fmt: skip
    names = sorted(e.name for e in manager.adapters.library.refresh() if e.report and e.report.compatible)
    rows = []
    with torch.inference_mode(), manager.session() as _, manager.on_device("transformer") as transformer:
        la, lb = manager.adapters.load(names[0], keep=names[:2]), manager.adapters.load(names[1], keep=names[:2])
        for size in args.sizes:
            options = GenerateOptions("a red fox in the snow", seed=1, steps=STEPS[args.kind], width=size,
                                      height=size, max_sequence_length=T5_TOKENS[args.kind])  # fmt: skip
            embeddings = encode(manager, options.prompt, options.max_sequence_length)
            one_at_a_time(manager, transformer, embeddings, [(1, ())], options)  # warm-up at this size
            cases = [(f"seeds x{n}, stack {la.name}", [(seed, ((la, 1.0),)) for seed in range(1, n + 1)], False)
                     for n in args.batch]  # fmt: skip
            cases.append((f"[base, {la.name}] (compare)", [(1, ()), (1, ((la, 1.0),))], True))
            cases.append((f"[base, {la.name}, {lb.name}] (grid column)", [(1, ()), (1, ((la, 0.5),)),
                          (1, ((lb, 0.5),))], True))  # fmt: skip
            for label, cells, mixed in cases:
                timing = measure(manager, transformer, embeddings, options, cells, mixed, args.repeat)
                row = {"size": size, "steps": options.steps, "case": label, "cells": len(cells), **timing}
                rows.append(row)
                print(f"{size:>4}px {label:42} alone {row['alone_s']:7.2f} s  batched {row['batched_s']:7.2f} s  "
                      f"ratio {row['batched_over_alone']:.3f}  max pixel diff {row['max_pixel_diff']:3d}/255  "
                      f"latent diff {row['max_latent_diff']:.2e}  (cells differ by up to {row['cells_differ_by']})",
                      flush=True)  # fmt: skip
    print(f"{args.kind} on {manager.device}, {torch.get_num_threads()} threads, {args.repeat} repeats (medians)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
