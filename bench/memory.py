"""CPU memory benchmark: peak RSS per memory strategy on the real-width kit, each strategy in a fresh process.

    python bench/memory.py [--kit tiny-wide] [--size 256] [--steps 2]

The tiny-wide kit is FLUX at its real width (3072) with one double and one single block: a 0.7 GB Q8_0 transformer,
so loading and placing it costs real memory, while T5, CLIP and the VAE are tiny. Each strategy runs in its own
process, so ru_maxrss (the process's peak resident set) is that strategy's alone; each generates two images (a new
seed, same prompt: the second is what "another image" costs once everything is loaded). On the CPU every move is a
no-op, so the strategies differ in what they keep in RAM between stages, not in device memory; bench/gpu_memory.py
measures a GPU. The images must be identical to resident's, pixel for pixel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo

from fluxdemo.model.manager import STRATEGIES  # noqa: E402
from fluxdemo.model.presets import get_preset  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.pipeline import (  # noqa: E402
    GenerateOptions,
    Model,  # noqa: E402
    generate,
)

PROMPT = "a lighthouse on a cliff at dusk"


def rss(field: str = "VmRSS") -> int:
    """The process's resident set now (VmRSS) or its peak since the last reset_peak() (VmHWM), from Linux's
    /proc/self/status (ru_maxrss, which the manager reports, is the same peak and is reset with it)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set to the current one


def measure(kit: str, strategy: str, size: int, steps: int) -> dict:
    folder = ensure_kit(kit)
    manager = Model(get_preset(kit, use_env=False), device="cpu", strategy=strategy, lora_dir=folder / "loras")
    base, seconds, images, peaks = rss(), [], [], []
    for seed in (0, 1):
        reset_peak()
        start = time.perf_counter()
        result = generate(manager, GenerateOptions(PROMPT, seed=seed, steps=steps, width=size, height=size))
        seconds.append(time.perf_counter() - start)
        peaks.append(rss("VmHWM"))
        images.append(np.asarray(result.images["baseline"]))
    memory = result.report.memory
    return {
        "strategy": strategy, "base_rss": base, "peak_rss": peaks[0], "second_peak_rss": peaks[1],
        "rss_after": rss(),
        "planned_peak": memory.predicted_peak_bytes, "first_s": seconds[0], "second_s": seconds[1],
        "image_sha256": hashlib.sha256(images[0].tobytes()).hexdigest(), "plan": memory.plan,
        "moves": [f"{m.action} {m.component}" for m in manager.moves],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", default="tiny-wide", choices=("tiny", "tiny-wide"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--json", type=Path, default=Path("bench/out/memory.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one strategy, printed as JSON
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.kit, args.child, args.size, args.steps)))
        return
    ensure_kit(args.kit)  # built once here, not raced by the children
    rows = []
    for strategy in args.strategies:
        command = [sys.executable, __file__, "--child", strategy, "--kit", args.kit, "--size", str(args.size),
                   "--steps", str(args.steps)]  # fmt: skip
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    reference = next((r["image_sha256"] for r in rows if r["strategy"] == "resident"), None)
    print(f"{args.kit} kit, {args.size}x{args.size}, {args.steps} steps, CPU ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, Python {platform.python_version()}")  # fmt: skip
    head = (f"{'strategy':14} {'base RSS':>8} {'peak RSS':>8} {'2nd peak':>8} {'RSS after':>9} {'planned':>8} "
            f"{'1st image':>9} {'2nd image':>9} {'same image':>10}")  # fmt: skip
    print(head, "-" * len(head), sep="\n")
    sizes = ("base_rss", "peak_rss", "second_peak_rss", "rss_after", "planned_peak")
    for r in rows:
        same = "yes" if r["image_sha256"] == reference else "NO"
        gb = {k: f"{r[k] / 1e9:.2f}GB" for k in sizes}
        print(f"{r['strategy']:14} {gb['base_rss']:>8} {gb['peak_rss']:>8} {gb['second_peak_rss']:>8} "
              f"{gb['rss_after']:>9} {gb['planned_peak']:>8} {r['first_s']:8.2f}s {r['second_s']:8.2f}s "
              f"{same:>10}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
