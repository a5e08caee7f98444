"""Speed ratios measured in one run, on the tiny kits (CPU) or whatever device is present.

    python bench/speed.py [--kind tiny tiny-wide] [--repeat 5] [--json out.json] [--threads 1]

Prints, per kit: compare / one generation, ours / plain diffusers FluxPipeline on the same modules (with a new
prompt every run, so both encode; and with a repeated prompt, where our embedding cache skips the encoders),
and LoRA load, A->B->A switch and strength change against one generation. Ratios, not seconds, because absolute
times on shared machines are noisy.

Then the experiment engine (issue 9), measured in interleaved rounds (one of each per round, a new prompt per round,
so every first use encodes) and compared by medians: a first compare (new ResultsCache) / one image; a follow-up
compare of the same prompt and seed with a new strength (same cache: encode and baseline reused) / one image; a grid
of 2 LoRAs x 3 strengths (0, 0.5, 1) x 1 seed = 6 cells (both strength-0 cells are the one baseline) / 6 images;
and the live-preview overhead, generate with Controls(preview=..., preview_every=k) / without, end to end at the
studio's tiny-kit size (256x256, 12 steps) and, per step, as one preview's cost / one step's (the timeline's
step seconds leave previews out) at the bench size and at 1024x1024.
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
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo
from fluxdemo.model.manager import default_device  # noqa: E402
from fluxdemo.model.presets import get_preset  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.pipeline import (  # noqa: E402
    GenerateOptions,
    Model,  # noqa: E402
    ResultsCache,  # noqa: E402
    compare,
    generate,
    grid,
    pipeline_view,
)
from fluxdemo.pipeline.previews import latent_preview  # noqa: E402
from fluxdemo.pipeline.stages import Controls, initial_noise  # noqa: E402

SETTINGS = {  # real width on a CPU is ~1 s per step at 128 px with a short T5 sequence
    "tiny": dict(width=64, height=64, steps=4, max_sequence_length=64),
    "tiny-wide": dict(width=128, height=128, steps=2, max_sequence_length=32),
}
PREVIEW_SIZE = dict(width=256, height=256, steps=12)  # the studio's default on a tiny kit (studio.default_options)
PREVIEW_EVERY = (1, 2, 4)  # preview_every values measured end to end
GRID_STRENGTHS = (0.0, 0.5, 1.0)
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


def timed(fn: Callable[..., object], *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def step_seconds(result) -> float:
    """The median denoising step of a run, from its timeline (previews are not counted in a step's seconds)."""
    return statistics.median(s.seconds for s in result.report.timeline if " step " in s.name)


def preview_ms(width: int, height: int, repeat: int = 50) -> float:
    """One preview as the loop pays it: packed latents -> latent_preview -> a callback that keeps the picture."""
    packed = initial_noise(0, width, height)
    kept = []
    return 1e3 * median_seconds(lambda: kept.append(latent_preview(packed, width, height)), repeat)


def bench_engine(manager: Model, kind: str, a: str, b: str, repeat: int) -> dict:
    """Issue 9's rows: interleaved rounds, each with new prompts; medians over rounds."""
    manager.adapters.max_loaded = 4
    shown = []
    preview = Controls(preview=lambda label, step, image: shown.append(image))
    compare(manager, options(kind), a, cache=ResultsCache())  # warm-up: both LoRAs loaded, every path run once
    grid(manager, options(kind), [f"a bird number {next(_fresh)}"], [1], [a, b], GRID_STRENGTHS)
    cells = len(GRID_STRENGTHS) * 2
    # Live previews: at the studio's tiny-kit size on tiny; a 256 px, 12-step image at real width is ~30 s on a
    # CPU, so tiny-wide uses the bench size with 4 steps and a preview every step (the worst case).
    every = PREVIEW_EVERY if kind == "tiny" else (1,)
    size = PREVIEW_SIZE if kind == "tiny" else {**SETTINGS[kind], "steps": 4}
    rounds = repeat * (5 if kind == "tiny" else 1)  # a tiny image takes 0.03-0.1 s: more samples, less noise
    times: dict[str, list[float]] = {}
    steps: list[float] = []
    for _ in range(rounds):
        rnd = {}
        rnd["single"], _ = timed(generate, manager, options(kind))
        o, cache = options(kind), ResultsCache()
        rnd["first"], _ = timed(compare, manager, o, a, 1.0, cache=cache)
        rnd["follow"], follow = timed(compare, manager, o, a, 0.5, cache=cache)
        assert "baseline" in follow.report.reused, follow.report.reused
        g = options(kind)
        rnd["grid"], made = timed(grid, manager, g, [g.prompt], [1], [a, b], GRID_STRENGTHS)
        assert len(made.images) == cells
        # One prompt for every preview run: its first, uncached encode is the untimed warm-up, then all are equal.
        p = options(kind, f"a fox number {next(_fresh)}")
        p = replace(p, width=size["width"], height=size["height"], steps=size["steps"])
        generate(manager, p)
        rnd["preview_off"], off = timed(generate, manager, p)
        steps.append(step_seconds(off))
        for k in every:
            rnd[f"preview_{k}"], _ = timed(generate, manager, p, controls=replace(preview, preview_every=k))
        for key, value in rnd.items():
            times.setdefault(key, []).append(value)
    med = {key: statistics.median(values) for key, values in times.items()}
    step = statistics.median(steps)
    one_preview = preview_ms(size["width"], size["height"])
    out = {
        "first_compare_over_single": med["first"] / med["single"],
        "follow_up_compare_over_single": med["follow"] / med["single"],
        "grid_over_n_singles": med["grid"] / (cells * med["single"]),
        "grid_cells": cells,
        "engine_single_s": med["single"], "first_compare_s": med["first"], "follow_up_s": med["follow"],
        "grid_s": med["grid"], "preview_size": f"{size['width']}x{size['height']}, {size['steps']} steps",
        "preview_step_ms": 1e3 * step, "preview_ms": one_preview, "preview_ms_1024": preview_ms(1024, 1024),
        "preview_per_step_k1": one_preview / (1e3 * step), "previews_shown": len(shown),
    }  # fmt: skip
    for k in every:
        out[f"preview_overhead_k{k}"] = med[f"preview_{k}"] / med["preview_off"] - 1
    return out


def plain_pipeline(manager: Model):
    """diffusers' FluxPipeline over our very modules, everything resident: the reference loop."""
    parts = {c: manager.get(c) for c in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    return pipeline_view(manager, "tokenizer", "tokenizer_2", scheduler=manager.scheduler(), **parts)


def bench_kind(kind: str, repeat: int) -> dict:
    kit = ensure_kit(kind)
    manager = Model(get_preset(kind, use_env=False), device=default_device(), strategy="resident",
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
    engine = bench_engine(manager, kind, a, b, repeat)
    return {
        **engine,
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    results = [bench_kind(kind, args.repeat) for kind in args.kind]
    rows = [
        ("compare / single generation", "compare_over_single", "target <= 2.05"),
        ("ours / plain diffusers, new prompt", "ours_over_plain_new_prompt", "target <= 1.03"),
        ("ours / plain diffusers, same prompt", "ours_over_plain_same_prompt", "embedding cache"),
        ("LoRA load / single generation", "lora_load_over_single", ""),
        ("LoRA switch A->B / single", "lora_switch_over_single", "target < 0.02"),
        ("strength change / single", "strength_change_over_single", ""),
        ("first compare / one image", "first_compare_over_single", "target <= 2.0"),
        ("follow-up compare (new strength) / one", "follow_up_compare_over_single", "target <= 1.1"),
        ("grid of 6 cells / 6 images", "grid_over_n_singles", "target <= 1.0"),
        ("preview every step, end to end - 1", "preview_overhead_k1", "target <= 0.05"),
        ("preview every 2 steps, end to end - 1", "preview_overhead_k2", ""),
        ("preview every 4 steps, end to end - 1", "preview_overhead_k4", ""),
        ("one preview / one step", "preview_per_step_k1", "= overhead at preview_every=1"),
    ]
    print(f"{'ratio':40}" + "".join(f"{r['kind']:>12}" for r in results))
    for label, key, note in rows:
        print(f"{label:40}" + "".join(f"{r[key]:12.3f}" if key in r else f"{'-':>12}" for r in results) + f"   {note}")
    for r in results:
        print(f"{r['kind']}: single {r['single_s']:.3f} s, LoRA load {r['lora_load_ms']:.1f} ms, switch "
              f"{r['lora_switch_ms']:.2f} ms, strength {r['strength_change_ms']:.2f} ms on {r['device']}")  # fmt: skip
        print(f"{r['kind']}: engine rounds: single {r['engine_single_s']:.3f} s, first compare "
              f"{r['first_compare_s']:.3f} s, "
              f"follow-up {r['follow_up_s']:.3f} s, grid {r['grid_s']:.3f} s; preview at {r['preview_size']}: "
              f"{r['preview_ms']:.3f} ms (1024x1024: {r['preview_ms_1024']:.3f} ms) per preview, step "
              f"{r['preview_step_ms']:.1f} ms")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
