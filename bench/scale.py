"""Scale-out on Ray Serve (issue 20), as ratios measured in one run on the CPU:

    python bench/scale.py [--kind tiny-wide] [--requests 12] [--rounds 2]

Two Serve applications side by side on a local Ray instance (4 logical CPUs: a replica asks one), one of 1 replica
and one of 2 (one torch thread each), each warmed (model loaded, LoRA and prompt seen) before it is timed; then
rounds that take turns between them, so a change in the machine's load falls on both:
1. Throughput: `--requests` single-image requests sent at once (each its own seed, so nothing is reused):
   seconds on 1 replica / seconds on 2, summed over the rounds. Target >= 1.6.
2. Compare latency: a compare (a new seed, so both images are made) on 2 replicas, its two images at once, against
   the same compare on 1 replica, one after the other: summed over the rounds. Target <= 0.65.

The figures depend on free cores: say how loaded the machine was (uptime) beside them.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo
from fluxdemo.model.presets import get_preset  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.pipeline import GenerateOptions, Model, compare, generate  # noqa: E402
from fluxdemo.serve import ServeSettings, serve_model  # noqa: E402

SIZES = {  # a real-width step on one CPU thread is about a second at 64 px with a short T5 sequence
    "tiny": dict(width=128, height=128, steps=8, max_sequence_length=64),
    "tiny-wide": dict(width=64, height=64, steps=2, max_sequence_length=32),
}
LORA = "peft.safetensors"
_seeds = itertools.count(1000)


def deployed(kind: str, replicas: int) -> Model:
    """A front model whose runs go to `replicas` fresh replicas of one thread each, warmed on the bench prompt."""
    kit = ensure_kit(kind)
    model = Model(get_preset(kind, use_env=False), device="cpu", lora_dir=kit / "loras")
    serve_model(model, ServeSettings(replicas=replicas, threads=1, app=f"bench-{replicas}"))
    options = GenerateOptions("a bench prompt", **SIZES[kind])
    with ThreadPoolExecutor(replicas * 2) as pool:  # every replica loads the model, its LoRA and the prompt
        list(pool.map(lambda _: compare(model, replace(options, seed=next(_seeds)), LORA), range(replicas * 2)))
    return model


def throughput_seconds(model: Model, kind: str, requests: int) -> float:
    options = GenerateOptions("a bench prompt", **SIZES[kind])
    start = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        list(
            pool.map(
                lambda seed: generate(model, replace(options, seed=seed)), [next(_seeds) for _ in range(requests)]
            )
        )
    return time.perf_counter() - start


def compare_seconds(model: Model, kind: str) -> float:
    options = GenerateOptions("a bench prompt", **SIZES[kind])
    start = time.perf_counter()
    compare(model, replace(options, seed=next(_seeds)), LORA)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="tiny-wide", choices=sorted(SIZES))
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)  # 3 replicas
    models = {replicas: deployed(args.kind, replicas) for replicas in (1, 2)}
    many, pair = {1: 0.0, 2: 0.0}, {1: 0.0, 2: 0.0}
    for n in range(args.rounds):
        for replicas, model in models.items():
            many[replicas] += throughput_seconds(model, args.kind, args.requests)
            pair[replicas] += compare_seconds(model, args.kind)
        load = os.getloadavg()[0]
        print(f"after round {n + 1}: {args.requests} requests {many[1]:.1f} s on 1 replica, {many[2]:.1f} s on 2; "
              f"compares {pair[1]:.1f} s on 1, {pair[2]:.1f} s on 2; load average {load:.1f}")  # fmt: skip
    serve.shutdown()
    ray.shutdown()
    print(f"kind {args.kind} {SIZES[args.kind]}, one thread per replica, {os.cpu_count()} CPUs")
    print(f"throughput, 2 replicas / 1: {many[1] / many[2]:.2f}x (target >= 1.6)")
    print(f"compare latency, fan-out on 2 replicas / 1 replica: {pair[2] / pair[1]:.2f} (target <= 0.65)")


if __name__ == "__main__":
    main()
