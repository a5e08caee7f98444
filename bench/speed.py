"""Speed ratios measured in one run, on the tiny kits (CPU) or whatever device is present.

    python bench/speed.py [--kind tiny tiny-wide] [--repeat 5] [--json out.json]

Prints, per kit: compare / one generation, ours / plain diffusers FluxPipeline on the same modules (with a new
prompt every run, so both encode; and with a repeated prompt, where our embedding cache skips the encoders),
and LoRA load, A->B->A switch and strength change against one generation. Ratios, not seconds, because absolute
times on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo
from fluxdemo.config import get_preset  # noqa: E402
from fluxdemo.manager import ModelManager, default_device  # noqa: E402
from fluxdemo.pipeline import GenerateOptions, compare, generate, pipeline_view  # noqa: E402
from fluxdemo.tiny import ensure_kit  # noqa: E402

SETTINGS = {  # real width on a CPU is ~1 s per step at 128 px with a short T5 sequence
    "tiny": dict(width=64, height=64, steps=4, max_sequence_length=64),
    "tiny-wide": dict(width=128, height=128, steps=2, max_sequence_length=32),
}
_fresh = itertools.count()


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def options(kind: str, prompt: str | None = None) -> GenerateOptions:
    return GenerateOptions(prompt or f"a cat number {next(_fresh)}", seed=1, **SETTINGS[kind])


def plain_pipeline(manager: ModelManager):
    """diffusers' FluxPipeline over our very modules, everything resident: the reference loop."""
    parts = {c: manager.get(c) for c in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    return pipeline_view(manager, "tokenizer", "tokenizer_2", scheduler=manager.scheduler(), **parts)


def bench_kind(kind: str, repeat: int) -> dict:
    kit = ensure_kit(kind)
    manager = ModelManager(get_preset(kind, use_env=False), device=default_device(), strategy="resident",
                           lora_dir=kit / "loras")  # fmt: skip
    loras = sorted(e.name for e in manager.adapters.library.refresh() if e.report and e.report.compatible)
    a, b = loras[0], loras[1]
    generate(manager, options(kind))  # warm-up: loads every component
    single = median_seconds(lambda: generate(manager, options(kind)), repeat)
    compare(manager, options(kind), a)  # loads LoRA a
    paired = median_seconds(lambda: compare(manager, options(kind), a), repeat)

    plain = plain_pipeline(manager)
    plain.set_progress_bar_config(disable=True)

    def run_plain(prompt: str) -> None:
        o = options(kind, prompt)
        generator = torch.Generator("cpu").manual_seed(o.seed)
        plain(o.prompt, num_inference_steps=o.steps, guidance_scale=o.guidance, height=o.height, width=o.width,
              max_sequence_length=o.max_sequence_length, generator=generator)  # fmt: skip

    plain_fresh = median_seconds(lambda: run_plain(f"a dog number {next(_fresh)}"), repeat)
    ours_fresh = median_seconds(lambda: generate(manager, options(kind, f"a dog number {next(_fresh)}")), repeat)
    plain_same = median_seconds(lambda: run_plain("the same prompt"), repeat)
    generate(manager, options(kind, "the same prompt"))
    ours_same = median_seconds(lambda: generate(manager, options(kind, "the same prompt")), repeat)

    adapters = manager.adapters
    adapters.max_loaded = 1  # so every load below is a real load from the file
    with manager.session():
        load = median_seconds(lambda: (adapters.load(b), adapters.load(a)), repeat) / 2
        adapters.max_loaded = 4
        la, lb = adapters.load(a), adapters.load(b)
        switch = median_seconds(lambda: (adapters.activate([(lb, 1.0)]), adapters.activate([(la, 1.0)])), repeat) / 2
        strength = median_seconds(lambda: adapters.activate([(la, 0.5)]), repeat)
        adapters.deactivate()
    return {
        "kind": kind, "device": str(manager.device), "settings": SETTINGS[kind],
        "single_s": single, "compare_s": paired, "compare_over_single": paired / single,
        "ours_over_plain_new_prompt": ours_fresh / plain_fresh, "ours_over_plain_same_prompt": ours_same / plain_same,
        "lora_load_over_single": load / single, "lora_switch_over_single": switch / single,
        "strength_change_over_single": strength / single,
        "lora_load_ms": load * 1e3, "lora_switch_ms": switch * 1e3, "strength_change_ms": strength * 1e3,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", nargs="+", default=["tiny", "tiny-wide"], choices=sorted(SETTINGS))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = [bench_kind(kind, args.repeat) for kind in args.kind]
    rows = [
        ("compare / single generation", "compare_over_single", "target <= 2.05"),
        ("ours / plain diffusers, new prompt", "ours_over_plain_new_prompt", "target <= 1.03"),
        ("ours / plain diffusers, same prompt", "ours_over_plain_same_prompt", "embedding cache"),
        ("LoRA load / single generation", "lora_load_over_single", ""),
        ("LoRA switch A->B / single", "lora_switch_over_single", "target < 0.02"),
        ("strength change / single", "strength_change_over_single", ""),
    ]
    print(f"{'ratio':40}" + "".join(f"{r['kind']:>12}" for r in results))
    for label, key, note in rows:
        print(f"{label:40}" + "".join(f"{r[key]:12.3f}" for r in results) + f"   {note}")
    for r in results:
        print(f"{r['kind']}: single {r['single_s']:.3f} s, LoRA load {r['lora_load_ms']:.1f} ms, switch "
              f"{r['lora_switch_ms']:.2f} ms, strength {r['strength_change_ms']:.2f} ms on {r['device']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
