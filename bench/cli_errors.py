"""How fast the CLI answers a mistake (issue 18: 16-28 s of imports before the sentence): each mistaken command as a
fresh process, its median wall time, and the ratio to importing torch alone, which every answer cost before.

    python bench/cli_errors.py [--runs 5] [--json out.json]

The tiny kit's LoRA folder is looked up, not built (a missing kit is no error: the library judges names after it is
built), so the numbers hold on a fresh machine too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--model", "tiny", "--prompt", "a cat"]


def mistakes(out: Path) -> dict[str, list[str]]:
    taken = out / "taken.png"
    taken.write_bytes(b"mine")
    return {
        "width 17": ["generate", *TINY, "--width", "17", "--out", str(out / "a.png")],
        "strength 9": ["generate", *TINY, "--lora", "peft:9", "--out", str(out / "a.png")],
        "unknown LoRA": ["compare", *TINY, "--lora", "nosuch", "--out", str(out / "c")],
        "missing file": ["generate", *TINY, "--lora", str(out / "gone.safetensors"), "--out", str(out / "a.png")],
        "--out exists": ["generate", *TINY, "--out", str(taken)],
    }


def seconds(argv: list[str], runs: int, expect: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != expect:
            raise SystemExit(f"{argv} exited {done.returncode}, not {expect}: {done.stderr.strip()}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch = seconds([sys.executable, "-c", "import torch"], args.runs, 0)
    results = {"import torch": torch}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in mistakes(Path(tmp)).items():
            results[name] = seconds([sys.executable, "-m", "fluxdemo", *argv], args.runs, 2)
    for name, s in results.items():
        print(f"{name:<14} {s:6.3f} s  {s / torch:5.2f}x import torch")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
