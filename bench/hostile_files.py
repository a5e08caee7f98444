"""What a hostile LoRA or GGUF file costs against a good one: the timing that tests/test_reliability.py leaves out.

The fuzz cases of the tests (tests/hostile.py: every named attack, then random mutations of the kit's LoRAs, and the
kit's GGUF files with their headers rewritten) go through what the app does with a file (a LoRA: inspect, convert,
load onto the live model; a GGUF: load), each timed against the same work on the unmodified file, in one run, so a
busy machine slows both. A parser that goes super-linear on some input shows as a ratio far above the rest.

    python bench/hostile_files.py [--random 400] [--top 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run from a checkout, without installing fluxdemo; tests' helpers

import hostile  # noqa: E402
from helpers import tiny_model  # noqa: E402

from fluxdemo.errors import FluxdemoError  # noqa: E402
from fluxdemo.lora import MAX_HEADER_BYTES, inspect_lora, to_diffusers  # noqa: E402
from fluxdemo.model import loading  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402

SEED = 1234


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    with contextlib.suppress(FluxdemoError):  # a refusal is an outcome; its cost is what is measured
        work()
    return time.perf_counter() - start


def lora_ratios(kit: Path, folder: Path, count: int) -> list[tuple[float, str]]:
    """(seconds / the good file's seconds, case) for every LoRA case, slowest first."""
    manager = tiny_model(folder)
    dims, clip = loading.model_dims(manager.config_dir())  # what the app checks a LoRA against
    peft, kohya = ((kit / "loras" / f"{n}.safetensors").read_bytes() for n in ("peft", "kohya"))
    cases = hostile.structured_cases(peft, kohya, MAX_HEADER_BYTES, folder / "unpickled")
    cases += hostile.random_cases([peft, kohya], random.Random(SEED), count)

    def one(path: Path) -> float:
        def work() -> None:
            inspect_lora(path, dims, clip_config=clip)
            to_diffusers(path, dims, clip)
            with manager.session():
                manager.adapters.load(path.name)

        return timed(work)

    def good(i: int) -> float:
        """The slower of the two unmodified files, each under a new name (nothing of it cached yet, as for a case)."""
        seconds = []
        for name, data in (("peft", peft), ("kohya", kohya)):
            path = hostile.Case(name, data).write(folder / f"good-{name}-{i}.safetensors")
            seconds.append(one(path))
            path.unlink()
        return max(seconds)

    good(-1)  # warm: imports and the transformer's first load are no file's cost
    ratios = []
    for i, case in enumerate(cases):
        path = case.write(folder / f"case-{i:04d}.safetensors")
        reference = statistics.median(good(3 * i + k) for k in range(3))  # beside each case: busy moments hit both
        ratios.append((one(path) / reference, case.name))
        path.unlink()
    return sorted(ratios, reverse=True)


def gguf_ratios(kit: Path, folder: Path) -> list[tuple[float, str]]:
    loaders = {"flux1-tiny-Q8_0.gguf": loading.load_transformer, "t5-v1_1-tiny-encoder-Q8_0.gguf": loading.load_t5}
    rng, ratios = random.Random(SEED), []
    for filename, load in loaders.items():
        good = kit / "gguf" / filename

        def one(path: Path, load=load) -> float:
            return timed(lambda: load(path, kit, torch.float32))

        one(good)  # warm
        for i, case in enumerate(hostile.gguf_cases(good, rng, flips=15)):
            path = case.write(folder / f"{i:03d}-{filename}")
            reference = statistics.median(one(good) for _ in range(3))
            ratios.append((one(path) / reference, f"{filename}: {case.name}"))
            path.unlink()
    return sorted(ratios, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random", type=int, default=400, help="random LoRA mutations beside the named attacks")
    parser.add_argument("--top", type=int, default=5, help="slowest cases to print per kind")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    kit = ensure_kit("tiny")
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "loras").mkdir()
        report = {"lora": lora_ratios(kit, Path(work) / "loras", args.random), "gguf": gguf_ratios(kit, Path(work))}
    for kind, ratios in report.items():
        median = statistics.median(r for r, _ in ratios)
        print(f"{kind}: {len(ratios)} files, median {median:.2f}x the good file's time")
        for ratio, name in ratios[: args.top]:
            print(f"  {ratio:6.2f}x  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
