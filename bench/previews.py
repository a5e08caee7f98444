"""What live previews cost: the latent projection and TAEF1, against a denoising step, and end to end under the budget.

    python bench/previews.py [--kind tiny-wide] [--size 128] [--steps 4] [--repeat 3] [--threads 1]

TAEF1 here is diffusers' AutoencoderTiny in TAEF1's architecture (16 latent channels, 64-wide blocks) with random
weights: the same arithmetic as madebyollin/taef1, which this machine cannot download. Printed: one denoising step
(median over the timeline's steps), one preview of each kind at the bench size and at 1024x1024 (median of 20, on
the manager's device), and generate with a TAEF1 preview due every step against no previews (medians of --repeat,
interleaved), with the number of previews the budget (fluxdemo.pipeline.previews.PREVIEW_BUDGET) let through.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo
from fluxdemo.model.manager import default_device  # noqa: E402
from fluxdemo.model.presets import get_preset  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.pipeline import (  # noqa: E402
    Controls,
    GenerateOptions,
    Model,  # noqa: E402
    generate,
)
from fluxdemo.pipeline.previews import PREVIEW_BUDGET, TinyDecoder, latent_preview  # noqa: E402
from fluxdemo.pipeline.stages import initial_noise  # noqa: E402


def preview_ms(draw, width: int, height: int, device: torch.device, repeat: int = 20) -> float:
    packed = initial_noise(0, width, height).to(device)
    draw(packed, width, height)  # warm-up (moves TAEF1 to the device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        draw(packed, width, height)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="tiny-wide", choices=["tiny", "tiny-wide"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import AutoencoderTiny

    ensure_kit(args.kind)
    manager = Model(get_preset(args.kind, use_env=False), device=default_device(), strategy="resident")
    torch.manual_seed(0)
    taef1 = TinyDecoder(AutoencoderTiny(latent_channels=16), "random weights, TAEF1's architecture")
    options = GenerateOptions("a lighthouse", seed=1, steps=args.steps, width=args.size, height=args.size,
                              max_sequence_length=32)  # fmt: skip
    generate(manager, options)  # warm-up: loads the model, encodes the prompt
    shown: list[int] = []
    with_taef1 = Controls(preview=lambda label, step, image: shown.append(step), preview_every=1, draw=taef1)
    plain_s, preview_s, steps = [], [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        plain = generate(manager, options)
        plain_s.append(time.perf_counter() - start)
        steps += [s.seconds for s in plain.report.timeline if " step " in s.name]
        start = time.perf_counter()
        generate(manager, options, controls=with_taef1)
        preview_s.append(time.perf_counter() - start)
    step_ms = 1e3 * statistics.median(steps)
    device = manager.device
    print(f"{args.kind} on {device}, {torch.get_num_threads()} threads, {args.size}x{args.size}, {args.steps} steps")
    print(f"one denoising step                      {step_ms:10.2f} ms")
    for name, draw in (("latent projection", latent_preview), ("TAEF1", taef1)):
        here = preview_ms(draw, args.size, args.size, device)
        big = preview_ms(draw, 1024, 1024, device, repeat=5)
        print(f"one {name:18} preview          {here:10.2f} ms  ({here / step_ms:.4f} of a step; 1024x1024: "
              f"{big:.2f} ms)")  # fmt: skip
    overhead = statistics.median(preview_s) / statistics.median(plain_s) - 1
    print(f"TAEF1 due every step, end to end - 1    {overhead:10.3f}     (budget {PREVIEW_BUDGET}; previews drawn "
          f"{len(shown)} of {args.steps * args.repeat})")  # fmt: skip


if __name__ == "__main__":
    main()
