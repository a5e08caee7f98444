"""Seconds per step and per compare: weight format x --compile (off, on, aot) x --fast, with and without a LoRA.

    python bench/gpu_speed.py                     # a CUDA GPU: FLUX.1-dev-sized random weights, 1024x1024, 28 steps
    python bench/gpu_speed.py --kind tiny-wide    # the CPU: the real-width kit at 128x128, 4 steps: ratios only
    python bench/gpu_speed.py --formats bf16 --compile on aot --fast off --budget-s 500 --json

On a GPU it builds once, under --work, the files bench/gpu_memory.py builds (a Q8_0 FLUX.1-dev transformer and T5-XXL
with seeded random weights: a lent machine reaches no Hub) and a rank-16 PEFT LoRA over the blocks' linear layers.
Per weight format and compile setting, one resident Model: a warm-up image (and the compile), then per fast setting
a base image, a LoRA image and a compare of the two, through the library (fluxdemo.pipeline), so the figures are the
product's. Seconds per step are medians of the timeline's step stages (with --fast, the image's denoising seconds over
its steps: predicted steps are what it saves). A new configuration is not started past --budget-s, so one call fits
the device tool's 10 minutes; the table says what was left out.

GPU targets (DESIGN.md): bf16 compiled with a LoRA <= 1.1x without; Q8_0 <= 1.3x bf16; a compare <= 2.0x one image;
within 2x of the ~75 ms/step floor (bf16 at 1024x1024 on an H100/H200). On the CPU the ratios are what to read:
compiled / eager per step, fast / exact per image and the mean pixel difference fast makes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/gpu_memory.py: the full-size file writer

from gpu_memory import bench_preset, build_files  # noqa: E402

from fluxdemo.lora.compile_options import AHEAD_OF_TIME, CompileSettings  # noqa: E402
from fluxdemo.model.loading import read_config  # noqa: E402
from fluxdemo.model.names import FluxDims  # noqa: E402
from fluxdemo.model.presets import PACKAGE_CONFIGS, get_preset  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.model.tiny_loras import canonical_pairs, write_lora  # noqa: E402
from fluxdemo.pipeline import GenerateOptions, Model, compare, generate  # noqa: E402

FLOOR_S_PER_STEP = 0.075  # bf16 FLUX.1-dev at 1024x1024 on an H100/H200 (../shared/research/gpu-speed.md)
PROMPT = "a lighthouse on a cliff at dusk"
LORA_RANK = 16
T5_TOKENS = {"tiny": 64, "tiny-wide": 32, "dev": 512}  # the kits' as bench/speed.py; FLUX.1-dev's own


@dataclass(frozen=True)
class Row:
    """One weight format x compile x fast setting."""

    weights: str
    compiled: str  # --compile: off, on (torch.compile) or aot (ahead of time)
    fast: bool
    step_s: float  # the base model, median seconds per step
    lora_step_s: float  # with the LoRA
    image_s: float  # one base image, the whole run (encode and decode included)
    compare_s: float  # the base image and the LoRA image of one compare
    warmup_s: float  # the model's first image: loading, and under --compile the compile
    pixels: np.ndarray = dataclasses.field(repr=False, compare=False)  # the base image, for fast vs exact

    @property
    def lora_ratio(self) -> float:
        return self.lora_step_s / self.step_s

    @property
    def compare_ratio(self) -> float:
        return self.compare_s / self.image_s


def step_seconds(report, steps: int, fast: bool) -> float:
    """Median seconds per step; with --fast the denoising seconds over the steps (a predicted step costs little)."""
    stepping = [s.seconds for s in report.timeline if " step " in s.name and s.name.rsplit("/", 1)[-1].isdigit()]
    return sum(stepping) / steps if fast else statistics.median(stepping)


def setup(kind: str, work: Path) -> tuple:
    """(preset, the LoRA folder, the LoRA's name) for the kind; dev builds its full-size random files once."""
    if kind != "dev":
        kit = ensure_kit(kind)
        return get_preset(kind, use_env=False), kit / "loras", "peft.safetensors"
    files = build_files(work, PACKAGE_CONFIGS, "Q8_0")
    lora = work / "loras" / f"peft-rank{LORA_RANK}.safetensors"
    if not lora.exists():
        dims = FluxDims.from_config(read_config(PACKAGE_CONFIGS, "transformer"))
        in_blocks = lambda bfl: bfl.startswith(("double_blocks.", "single_blocks."))  # noqa: E731
        write_lora(lora, "peft", canonical_pairs(dims, rank=LORA_RANK, seed=0, modules=in_blocks), dims)
    return bench_preset(files, ensure_kit("tiny"), "Q8_0"), lora.parent, lora.name


def measure_model(model: Model, options: GenerateOptions, lora: str, fasts: list[bool], compiled: str) -> list[Row]:
    """A warm-up image, then per fast setting: a base image, a LoRA image, a compare (new seeds: nothing reused)."""
    start = time.perf_counter()
    generate(model, dataclasses.replace(options, steps=2, seed=100), lora, 1.0)  # loads, swaps and compiles
    warmup = time.perf_counter() - start
    rows = []
    for fast in fasts:  # the same seeds each way, so fast and exact pictures can be compared
        o = dataclasses.replace(options, fast=fast)
        base = generate(model, o)
        with_lora = generate(model, dataclasses.replace(o, seed=10), lora, 1.0)
        both = compare(model, dataclasses.replace(o, seed=20), lora, 1.0)
        rows.append(
            Row(
                weights=model.weights_choice.format,
                compiled=compiled,
                fast=fast,
                step_s=step_seconds(base.report, o.steps, fast),
                lora_step_s=step_seconds(with_lora.report, o.steps, fast),
                image_s=base.report.seconds,
                compare_s=both.report.seconds,
                warmup_s=warmup,
                pixels=np.asarray(base.images["baseline"]).astype(np.float64),
            )
        )
    return rows


def configurations(formats: list[str], compiles: list[str]) -> list[tuple[str, str]]:
    """The (weights, compile) pairs to run: --compile needs dense weights (fp8 without fp8 units is a line)."""
    return [(w, c) for w in formats for c in compiles if not (c != "off" and w == "gguf")]


def run_all(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    device = torch.device("cuda" if torch.cuda.is_available() and args.kind == "dev" else "cpu")
    preset, lora_dir, lora = setup(args.kind, Path(args.work))
    options = GenerateOptions(PROMPT, 0, args.steps, 3.5, args.size, args.size, T5_TOKENS[args.kind])
    fasts = [{"off": False, "on": True}[f] for f in args.fast]
    rows, skipped, start = [], [], time.perf_counter()
    for weights, compiled in configurations(args.formats, args.compile):
        name = f"{weights}{'' if compiled == 'off' else f' compile {compiled}'}"
        if time.perf_counter() - start > args.budget_s:
            skipped.append(f"{name}: past the {args.budget_s:.0f} s budget")
            continue
        backend = AHEAD_OF_TIME if compiled == "aot" else args.backend
        settings = CompileSettings(backend=backend) if compiled != "off" else None
        try:
            model = Model(preset, device=device, strategy="resident", weights=weights, compile=settings,
                          lora_dir=lora_dir)  # fmt: skip
            rows += measure_model(model, options, lora, [f for f in fasts if not (compiled == "on" and f)], compiled)
        except Exception as e:  # one configuration that cannot run (memory, fp8 units, torchao) is a line, not the end
            skipped.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
        model = None
        if compiled == "on" and True in fasts:
            skipped.append(f"{name} fast: fast mode does not work with torch.compile (it does with aot)")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, skipped


def _find(rows: list[Row], weights: str, compiled: str, fast: bool) -> Row | None:
    return next((r for r in rows if (r.weights, r.compiled, r.fast) == (weights, compiled, fast)), None)


def verdicts(rows: list[Row], gpu: bool) -> list[str]:
    """The ratios the issue asks for, where both sides ran; the floor on a GPU only."""
    out = []
    for r in rows:
        if r.compiled != "off" and (eager := _find(rows, r.weights, "off", r.fast)):
            ratio = r.step_s / eager.step_s
            apart = np.abs(r.pixels - eager.pixels).max()  # the same seed: compiling must not move the picture
            out.append(f"{r.weights}{' fast' * r.fast}: compile {r.compiled} / eager per step {ratio:.2f}x "
                       f"(with the LoRA {r.lora_step_s / eager.lora_step_s:.2f}x), pixels at most {apart:.0f}/255 "
                       "apart")  # fmt: skip
        if r.fast and (exact := _find(rows, r.weights, r.compiled, False)):
            difference, ratio = np.abs(r.pixels - exact.pixels).mean(), r.image_s / exact.image_s
            out.append(f"{r.weights}: fast / exact per image {ratio:.2f}x, "
                       f"mean pixel difference {difference:.2f}/255")  # fmt: skip
    for c in (r for r in rows if r.weights == "bf16" and r.compiled != "off" and not r.fast):
        out.append(f"target bf16 compile {c.compiled} + LoRA <= 1.1x without: {c.lora_ratio:.2f}x")
    if (q := _find(rows, "gguf", "off", False)) and (b := _find(rows, "bf16", "off", False)):
        out.append(f"target Q8_0 <= 1.3x bf16 (eager): {q.step_s / b.step_s:.2f}x")
    if rows:
        worst = max(rows, key=lambda r: r.compare_ratio)
        out.append(f"target a compare <= 2.0x one image: at most {worst.compare_ratio:.2f}x")
    if rows and gpu:
        best = min(r.step_s for r in rows)
        out.append(f"fastest step {best:.3f} s: {best / FLOOR_S_PER_STEP:.1f}x the {FLOOR_S_PER_STEP} s floor")
    return out


def table(rows: list[Row]) -> str:
    lines = ["| weights | compile | fast | s/step | s/step + LoRA | LoRA / base | image s | compare s | "
             "compare / image | first image s |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.weights} | {r.compiled} | {'yes' if r.fast else 'no'} | "
                     f"{r.step_s:.3f} | {r.lora_step_s:.3f} | {r.lora_ratio:.2f} | {r.image_s:.2f} | "
                     f"{r.compare_s:.2f} | {r.compare_ratio:.2f} | {r.warmup_s:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="dev" if gpu else "tiny-wide", choices=("dev", "tiny-wide", "tiny"))
    p.add_argument("--size", type=int, default=None, help="default: 1024 for dev, 128 for a kit")
    p.add_argument("--steps", type=int, default=None, help="default: 28 for dev, 4 for a kit")
    p.add_argument("--formats", nargs="+", default=["gguf", "bf16", "fp8"], choices=("gguf", "bf16", "fp8"))
    p.add_argument("--compile", nargs="+", default=["off", "on", "aot"], choices=("off", "on", "aot"))
    p.add_argument("--fast", nargs="+", default=["off", "on"], choices=("off", "on"))
    p.add_argument("--backend", default="inductor", help="torch.compile's backend (aot_eager: no kernels, quick)")
    p.add_argument("--budget-s", type=float, default=480, help="start no configuration after this many seconds")
    p.add_argument("--work", default="bench/out/gpu", help="where the full-size files are built (dev)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.size = args.size or (1024 if args.kind == "dev" else 128)
    args.steps = args.steps or (28 if args.kind == "dev" else 4)
    rows, skipped = run_all(args)
    where = torch.cuda.get_device_name() if gpu and args.kind == "dev" else platform.processor() or "CPU"
    print(f"{args.kind} at {args.size}x{args.size}, {args.steps} steps, on {where}, torch {torch.__version__}")
    print(table(rows))
    on_gpu = gpu and args.kind == "dev"
    for line in [*verdicts(rows, on_gpu), *(f"not run: {s}" for s in skipped)]:
        print(f"- {line}")
    if args.json:
        print(json.dumps({"rows": [{k: v for k, v in dataclasses.asdict(r).items() if k != "pixels"} for r in rows],
                          "verdicts": verdicts(rows, on_gpu), "skipped": skipped}))  # fmt: skip


if __name__ == "__main__":
    main()
