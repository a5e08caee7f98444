"""CPU benchmark at FLUX.1-dev's real size: peak anonymous and file-backed RSS, load seconds, plan vs measurement.

    nice python bench/fullsize.py [--strategies resident model-offload group-offload disk] [--size 64] [--steps 1]

Builds once, under --work (default bench/out/fullsize, git-ignored), files of FLUX.1-dev's real size with seeded random
weights in the real layouts, with bench/gpu_memory.py's writer (a 12.8 GB Q8_0 transformer GGUF in city96's layout,
a 5.4 GB Q8_0 T5-XXL GGUF in llama.cpp's, CLIP-L and the VAE as bf16 safetensors: 18.7 GB, about 11 minutes on two
cores) and a rank-4 PEFT LoRA over every linear layer in the blocks.

Then, first, the CLI as a user runs it (`python -m fluxdemo generate --model dev-q8` with the local files), and per
memory strategy a fresh process that runs `generate` and then `compare` with the LoRA (one step, fp32 on the CPU). This
process samples each child's RssAnon and RssFile from /proc/<pid>/status every 20 ms, because the kernel keeps a peak
of their sum only (VmHWM). Prints a table: peak anonymous and file-backed RSS, load seconds per component, seconds per
command, the planner's predictions against the measurement, and whether the images are the same across runs. It takes
tens of minutes on two cores: a benchmark, not a test. Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/gpu_memory.py: the file writer

from gpu_memory import bench_preset, build_files  # noqa: E402

from fluxdemo.model.loading import read_config  # noqa: E402
from fluxdemo.model.manager import STRATEGIES  # noqa: E402
from fluxdemo.model.names import FluxDims  # noqa: E402
from fluxdemo.model.presets import PACKAGE_CONFIGS  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.model.tiny_loras import canonical_pairs, write_lora  # noqa: E402
from fluxdemo.pipeline import (  # noqa: E402
    GenerateOptions,
    Model,  # noqa: E402
    compare,
    generate,
)

QUANT = "Q8_0"
PROMPT = "a lighthouse on a cliff at dusk"
LORA = "peft-rank4.safetensors"
COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")
GiB = 2**30


def build(work: Path) -> dict[str, Path]:
    files = build_files(work, PACKAGE_CONFIGS, QUANT)
    lora = work / "loras" / LORA
    if not lora.exists():
        dims = FluxDims.from_config(read_config(PACKAGE_CONFIGS, "transformer"))
        in_blocks = lambda bfl: bfl.startswith(("double_blocks.", "single_blocks."))  # noqa: E731
        write_lora(lora, "peft", canonical_pairs(dims, rank=4, seed=0, modules=in_blocks), dims)
    return files


def image_hash(image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


# -- one strategy, in its own process -------------------------------------------------------------------------------
def measure(files: Mapping[str, Path], kit: Path, strategy: str, size: int, steps: int) -> dict:
    torch.manual_seed(0)
    manager = Model(bench_preset(files, kit, QUANT), device="cpu", strategy=strategy,
                           lora_dir=files["transformer"].parent / "loras")  # fmt: skip
    options = GenerateOptions(PROMPT, seed=0, steps=steps, width=size, height=size)
    start = time.perf_counter()
    one = generate(manager, options)
    generate_s = time.perf_counter() - start
    start = time.perf_counter()
    two = compare(manager, options, LORA)
    compare_s = time.perf_counter() - start
    loads: dict[str, float] = {}
    for move in manager.moves:
        if move.kind == "load":
            loads.setdefault(move.component, move.seconds)  # the first load; disk reads T5 and the transformer again
    memory = one.report.memory
    stages = {s.name: s.seconds for s in one.report.timeline}
    return {
        "strategy": memory.strategy, "ram": memory.ram, "plan": memory.plan,
        "predicted_peak_bytes": memory.predicted_peak_bytes, "predicted_ram_bytes": memory.predicted_ram_bytes,
        "load_s": loads, "first_use_s": {k: v for k, v in stages.items() if k.startswith(("encode", "baseline step"))},
        "generate_s": generate_s, "compare_s": compare_s, "reused": two.report.reused,
        "images": {"baseline": image_hash(one.images["baseline"]), "lora": image_hash(two.images["lora"]),
                   "compare baseline": image_hash(two.images["baseline"])},
    }  # fmt: skip


def sampled(command: list[str], env: Mapping[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run command; sample its RssAnon, RssFile and VmHWM every 20 ms; return its result and the peaks in bytes."""
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as child:
        out_err: list[str] = []
        reader = _drain(child, out_err)
        while child.poll() is None:
            try:
                with open(f"/proc/{child.pid}/status") as f:
                    for line in f:
                        key, _, value = line.partition(":")
                        if key in peaks:
                            peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
            except (OSError, ValueError):  # the child is exiting
                pass
            time.sleep(0.02)
        reader.join()
    return subprocess.CompletedProcess(command, child.returncode, out_err[0], out_err[1]), peaks


def _drain(child: subprocess.Popen, into: list[str]) -> threading.Thread:
    """Read the child's output in a thread, so a full pipe never blocks it while we sample."""
    thread = threading.Thread(target=lambda: into.extend(child.communicate()), daemon=True)
    thread.start()
    return thread


def run_cli(files: Mapping[str, Path], kit: Path, work: Path, size: int, steps: int) -> dict:
    """The issue's acceptance command, as a user types it, with the local files."""
    out = work / "cli.png"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "fluxdemo", "generate", "--model", "dev-q8", "--device", "cpu",
               "--transformer", str(files["transformer"]), "--t5", str(files["text_encoder_2"]),
               "--clip", str(files["text_encoder"]), "--vae", str(files["vae"]), "--prompt", PROMPT, "--seed", "0",
               "--width", str(size), "--height", str(size), "--steps", str(steps), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "FLUXDEMO_TOKENIZER": str(kit / "tokenizer"), "FLUXDEMO_TOKENIZER_2": str(kit / "tokenizer_2")}  # fmt: skip
    start = time.perf_counter()
    done, peaks = sampled(command, env)
    row = {"strategy": "CLI (auto)", "command": " ".join(command[1:]), "seconds": time.perf_counter() - start,
           "returncode": done.returncode, **_peaks(peaks)}  # fmt: skip
    if done.returncode != 0:
        return {**row, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"}
    from PIL import Image

    return {**row, "images": {"baseline": image_hash(Image.open(out).convert("RGB"))}}


def _peaks(peaks: Mapping[str, int]) -> dict:
    return {"peak_anon_bytes": peaks["RssAnon"], "peak_file_bytes": peaks["RssFile"], "peak_rss_bytes": peaks["VmHWM"]}


# -- the table ------------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = (f"{'run':14} {'RAM':11} {'peak anon':>9} {'peak file':>9} {'peak RSS':>8} {'planned':>8} "
            f"{'plan anon':>9} {'load s T / T5 / CLIP / VAE':>27} {'gen s':>6} {'cmp s':>6} {'same':>5}")  # fmt: skip
    lines = [head, "-" * len(head)]
    reference = {}  # the first run's image of each kind: every run must reproduce it
    for r in rows:
        for kind, digest in r.get("images", {}).items():
            reference.setdefault("lora" if kind == "lora" else "baseline", digest)
    for r in rows:
        if "error" in r:
            lines.append(f"{r['strategy']:14} error: {r['error']}")
            continue
        gib = {
            k: f"{r[k] / GiB:.2f}G" if k in r else "-"
            for k in (
                "peak_anon_bytes",
                "peak_file_bytes",
                "peak_rss_bytes",
                "predicted_peak_bytes",
                "predicted_ram_bytes",
            )
        }
        loads = " / ".join(f"{r['load_s'][c]:.1f}" if c in r.get("load_s", {}) else "-" for c in COMPONENTS)
        same = all(h == reference["lora" if k == "lora" else "baseline"] for k, h in r["images"].items())
        gen = r.get("generate_s", r.get("seconds", 0.0))
        cmp = f"{r['compare_s']:6.0f}" if "compare_s" in r else f"{'-':>6}"
        lines.append(
            f"{r['strategy']:14} {r.get('ram', '(auto)'):11} {gib['peak_anon_bytes']:>9} {gib['peak_file_bytes']:>9} "
            f"{gib['peak_rss_bytes']:>8} {gib['predicted_peak_bytes']:>8} {gib['predicted_ram_bytes']:>9} "
            f"{loads:>27} {gen:6.0f} {cmp} {'yes' if same else 'NO':>5}"
        )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image width and height (default 64)")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps (default 1)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--no-cli", dest="cli", action="store_false", help="skip the CLI run")
    parser.add_argument("--work", type=Path, default=Path("bench/out/fullsize"), help="where the files are built")
    parser.add_argument("--json", type=Path, default=Path("bench/out/fullsize.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one strategy, printed as JSON
    args = parser.parse_args()
    kit = ensure_kit("tiny")  # only its tokenizers are used (their ids are valid for the real vocabularies)
    files = build(args.work)
    if args.child:
        print(json.dumps(measure(files, kit, args.child, args.size, args.steps)))
        return
    rows = []
    if args.cli:
        rows.append(run_cli(files, kit, args.work, args.size, args.steps))
        print(table(rows).splitlines()[-1], flush=True)
    for strategy in args.strategies:
        command = [sys.executable, __file__, "--child", strategy, "--work", str(args.work), "--size", str(args.size),
                   "--steps", str(args.steps)]  # fmt: skip
        done, peaks = sampled(command)
        if done.returncode != 0:
            rows.append({"strategy": strategy, "error": done.stderr.strip().splitlines()[-1]})
        else:
            rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), **_peaks(peaks)})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                   "date": datetime.date.today().isoformat(), "size": args.size, "steps": args.steps}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")  # after every run
    print(f"\n{args.size}x{args.size}, {args.steps} step(s), CPU ({os.cpu_count()} cores), fp32, torch "
          f"{torch.__version__}\n{table(rows)}")  # fmt: skip


if __name__ == "__main__":
    main()
