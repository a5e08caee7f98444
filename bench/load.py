"""Load on the app: N mixed requests from C concurrent clients, with latency percentiles, errors and isolation.

    python bench/load.py [--requests 100] [--concurrency 16] [--kind tiny] [--size 32] [--steps 2]
                         [--queue-size 128] [--no-check] [--json out.json]
    python bench/load.py --url http://127.0.0.1:7860/ --loras a.safetensors b.safetensors [...]

Without --url it launches the studio on a tiny kit in this process, on 127.0.0.1. Request i is a compare, a generate
or a sweep, with one of the LoRAs at one of several strengths (the mix of tests/helpers.py), and its own
seed; C worker threads each hold one gradio_client Client (one session each, as C browsers would) and take the next
request when the last is done. Latency is submit to result, waiting in the queue included. Errors are counted by
their message (gradio's "Queue is full" among them). On the launched kit, unless --no-check, every request that came
back is run again, alone, through the library on a second manager, and any result that differs by a pixel counts as
a mix-up: the model is shared, so that is what a missing lock would show.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gradio_client import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run from a checkout, without installing fluxdemo; tests' helpers

import helpers  # noqa: E402

from fluxdemo.model.manager import default_device  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.pipeline import GenerateOptions  # noqa: E402
from fluxdemo.studio import build_studio  # noqa: E402

KIT_LORAS = sorted({lora for _, lora, _ in helpers.MIX if lora})  # the mix's LoRAs, in the order --loras stand in


def plan(n: int, loras: list[str], size: int, steps: int) -> list[tuple[str, str | None, object, GenerateOptions]]:
    """Request i is helpers.MIX[i], its kit LoRA replaced by the one at the same place in `loras`."""
    requests = []
    for i in range(n):
        endpoint, lora, strength = helpers.MIX[i % len(helpers.MIX)]
        prompt = f"request {i % 7}: a lighthouse at dusk"  # repeats, so the embedding cache is exercised too
        options = GenerateOptions(prompt, seed=1000 + i, steps=steps, width=size, height=size)
        chosen = None if lora is None else loras[KIT_LORAS.index(lora) % len(loras)]
        requests.append((endpoint, chosen, strength, options))
    return requests


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(url: str, requests: list, concurrency: int) -> tuple[list[dict], float]:
    local = threading.local()

    def one(item) -> dict:
        endpoint, lora, strength, options = item
        if not hasattr(local, "client"):
            local.client = Client(url, verbose=False)
        start = time.perf_counter()
        try:
            result = local.client.predict(*helpers.api_args(options, lora, strength), api_name=f"/{endpoint}")
            error = None
        except Exception as e:  # counted, not raised: an error is one of the numbers this measures
            result, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return {"endpoint": endpoint, "seconds": time.perf_counter() - start, "error": error, "result": result}

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(one, requests))
    return outcomes, time.perf_counter() - start


def summary(outcomes: list[dict], wall: float) -> dict:
    ok = [o["seconds"] for o in outcomes if o["error"] is None]
    by_endpoint = {}
    for endpoint in sorted({o["endpoint"] for o in outcomes}):
        seconds = [o["seconds"] for o in outcomes if o["endpoint"] == endpoint and o["error"] is None]
        by_endpoint[endpoint] = {"n": len(seconds), "p50_s": percentile(seconds, 50), "p95_s": percentile(seconds, 95)}
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": len(outcomes) - len(ok),
        "error_messages": dict(Counter(o["error"] for o in outcomes if o["error"])),
        "p50_s": percentile(ok, 50),
        "p95_s": percentile(ok, 95),
        "max_s": max(ok, default=float("nan")),
        "mean_s": statistics.fmean(ok) if ok else float("nan"),
        "wall_s": wall,
        "throughput_per_s": len(ok) / wall if wall else float("nan"),
        "by_endpoint": by_endpoint,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kind", default="tiny", help="tiny kit to launch on (without --url)")
    parser.add_argument("--url", help="an app already running; then --loras names the LoRAs to use")
    parser.add_argument("--loras", nargs="+", help="LoRA names in the app's folder (default: the kit's)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--queue-size", type=int, default=None, help="the app's queue bound (default: --requests)")
    parser.add_argument("--no-check", action="store_true", help="skip running each request alone to compare")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    demo = reference = None
    if args.url:
        url, loras = args.url, args.loras
        if not loras:
            parser.error("--url needs --loras: the names of LoRAs in that app's folder")
    else:
        kit = ensure_kit(args.kind)
        manager = helpers.tiny_model(kit / "loras", args.kind, device=default_device())
        loras = args.loras or KIT_LORAS
        demo = build_studio(manager, queue_size=args.queue_size or args.requests)
        demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
        url = demo.local_url
        if not args.no_check:  # the same files on a manager of its own; an app elsewhere cannot be checked so
            reference = helpers.tiny_model(kit / "loras", args.kind, device=default_device())
    if not loras:
        parser.error("no LoRAs to use: pass --loras")
    requests = plan(args.requests, loras, args.size, args.steps)
    try:
        Client(url, verbose=False).predict(*helpers.api_args(requests[1][3], None, 1.0), api_name="/generate")  # warm
        outcomes, wall = run(url, requests, args.concurrency)
    finally:
        if demo is not None:
            demo.close()
    report = summary(outcomes, wall)
    if reference is not None:
        mixups = 0
        for (endpoint, lora, strength, options), outcome in zip(requests, outcomes, strict=True):
            if outcome["error"] is None:
                served = helpers.served(endpoint, outcome["result"])
                mixups += not helpers.same(served, helpers.alone(reference, endpoint, options, lora, strength))
        report["mixups"] = mixups

    print(f"{report['requests']} requests, {args.concurrency} concurrent clients, {args.size}px, {args.steps} steps")
    print(f"  ok {report['ok']}, errors {report['errors']}, mix-ups {report.get('mixups', 'not checked')}")
    print(f"  latency p50 {report['p50_s']:.2f} s, p95 {report['p95_s']:.2f} s, max {report['max_s']:.2f} s")
    print(f"  wall {report['wall_s']:.1f} s, {report['throughput_per_s']:.2f} requests/s")
    for endpoint, s in report["by_endpoint"].items():
        print(f"  {endpoint:8} n {s['n']:4}  p50 {s['p50_s']:.2f} s  p95 {s['p95_s']:.2f} s")
    for message, count in report["error_messages"].items():
        print(f"  error x{count}: {message}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
