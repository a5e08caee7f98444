"""A soak of the studio on a public link (issue 16): C visitors at once for a bounded time, with ping latency, RSS,
disk and isolation.

    python bench/soak.py [--seconds 60] [--clients 24] [--ping-every 0.25] [--hub-quota-kb 400] [--no-hostile]
                         [--no-check] [--json out.json]

It launches the studio on the tiny kit in this process, on 127.0.0.1, in the public posture (public=True: each
visitor's caches apart, no host facts), with a copy of the kit's LoRA folder and Hub LoRAs served by the tests'
loopback fake Hub (tests/soak_mix.py, which tests/test_soak.py shares). Each visitor (its own gradio_client Client, one
session) loops over the mix until --seconds have passed: compare, generate, a 2x2 grid, an upload of a kit LoRA, a Hub
LoRA fetched with /hub_lora then compared, PNGs dropped for their settings (A1111 text and the 12,992x12,992 bomb),
and, unless --no-hostile, a Hub name never fetched, a Hub file listed small but served large, 32 kB of A1111 text and a
PNG whose zipped chunk inflates to 52 MB. Meanwhile a pinger GETs /gradio_api/info every --ping-every seconds, and a
sampler reads the server's RSS and disk (the Hub LoRA cache, gradio's cache, the studio's run folders, the LoRA folder)
every 2 s. The RSS is this process's, the in-process clients included.

Afterwards, unless --no-check, every model result is compared pixel for pixel with the same request run alone
through the library on a second manager (mix-ups), and every hostile request with the sentence or settings it must
get (unanswered). It prints a JSON summary: ping max/p99/p50 and the count over 1 s, RSS and disk at start, middle
and end, requests and latency by kind, errors by message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # run from a checkout, without installing fluxdemo; tests' helpers

import helpers  # noqa: E402
import soak_mix as sm  # noqa: E402
from gradio_client import Client  # noqa: E402

from fluxdemo.model.manager import default_device  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.pipeline import Model  # noqa: E402


class Sampler(threading.Thread):
    """sm.footprint every `every` seconds until stopped, each with its time since the start."""

    def __init__(self, folders: dict[str, Path], every: float = 2.0) -> None:
        super().__init__(name="sampler", daemon=True)
        self.folders, self.every = folders, every
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self._start = time.monotonic()

    def run(self) -> None:
        while True:
            self.samples.append({"t_s": round(time.monotonic() - self._start, 1), **sm.footprint(self.folders)})
            if self._halt.wait(self.every):
                break

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)
        self.samples.append({"t_s": round(time.monotonic() - self._start, 1), **sm.footprint(self.folders)})


def by_kind(outcomes: list[sm.Outcome]) -> dict:
    kinds = {}
    for kind in sorted({o.kind for o in outcomes}):
        seconds = [o.seconds for o in outcomes if o.kind == kind]
        kinds[kind] = {"n": len(seconds), "errors": sum(o.error is not None for o in outcomes if o.kind == kind),
                       "p50_s": statistics.median(seconds), "max_s": max(seconds)}  # fmt: skip
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="how long the visitors keep sending")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--ping-every", type=float, default=0.25)
    parser.add_argument("--hub-quota-kb", type=int, default=400, help="the Hub LoRA cache's quota")
    parser.add_argument("--no-hostile", action="store_true", help="leave the hostile requests out of the mix")
    parser.add_argument("--no-check", action="store_true", help="skip the solo runs and the answers' check")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the studio logs each refused request's sentence as a warning

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.pop(var, None)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    kit = ensure_kit("tiny")
    work = Path(tempfile.mkdtemp(prefix="fluxdemo-soak-"))
    try:
        os.environ["GRADIO_TEMP_DIR"] = str(work / "gradio")
        (work / "tmp").mkdir()
        tempfile.tempdir = str(work / "tmp")  # the studio's run folders, measured apart from the clients' downloads
        lora_dir = work / "loras"
        shutil.copytree(kit / "loras", lora_dir)
        kit_lora = kit / "loras" / "peft.safetensors"
        folders = {"hub_cache": work / "hub-loras", "gradio_cache": work / "gradio", "runs": work / "tmp",
                   "lora_folder": lora_dir}  # fmt: skip
        pngs = sm.hostile_pngs(work / "pngs")
        quota = args.hub_quota_kb * 1000

        def manager() -> Model:
            return helpers.tiny_model(lora_dir, device=default_device())

        app = manager()
        with sm.fake_hub(kit / "loras") as hub:
            sm.use_hub(app, hub.endpoint, folders["hub_cache"], quota, helpers.MAX_UPLOAD)
            with helpers.launched(app, queue_size=64, public=True) as url:
                warm = sm.model_values("compare", 0)
                Client(url, verbose=False, download_files=str(work / "dl")).predict(*warm, api_name="/compare")
                pinger, sampler = sm.Pinger(url, args.ping_every), Sampler(folders)
                pinger.start()
                sampler.start()
                start = time.perf_counter()
                try:
                    outcomes = sm.soak(url, args.clients, pngs, kit_lora, work / "downloads", seconds=args.seconds,
                                       hostile=not args.no_hostile)  # fmt: skip
                    wall = time.perf_counter() - start
                finally:
                    pinger.stop()
                    sampler.stop()
                # the app still answers a plain compare afterwards
                after = Client(url, verbose=False, download_files=str(work / "dl")).predict(*warm, api_name="/compare")
            report = {
                "clients": args.clients,
                "seconds": args.seconds,
                "wall_s": wall,
                "requests": len(outcomes),
                "requests_per_s": len(outcomes) / wall,
                "errors": sum(o.error is not None for o in outcomes),
                "ping": pinger.summary(),
                "footprint": {
                    "start": sampler.samples[0],
                    "middle": sampler.samples[len(sampler.samples) // 2],
                    "end": sampler.samples[-1],
                    "max_rss_bytes": max(s["rss_bytes"] for s in sampler.samples),
                },
                "hub_quota_bytes": quota,
                "by_kind": by_kind(outcomes),
                "error_messages": sm.error_counts(outcomes),
            }
            if not args.no_check:
                clean = manager()
                sm.use_hub(clean, hub.endpoint, work / "clean-hub", quota, helpers.MAX_UPLOAD)
                found = sm.problems(outcomes, clean, lora_dir, kit_lora)
                whole = helpers.same(sm.served("compare", after), sm.solo(clean, "compare", warm))
                found["after"] = [] if whole else ["the compare after the soak differs from its solo run"]
                report |= {"mixups": len(found["mixups"]), "unanswered": len(found["unanswered"]),
                           "unexpected_errors": len(found["errors"]), "problems": found}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(json.dumps(report, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
