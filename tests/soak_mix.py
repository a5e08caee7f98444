"""A soak of the studio on a public link (issue 16), shared by tests/test_soak.py (a fixed number of requests,
asserted) and bench/soak.py (a duration, figures).

Many visitors at once, each with its own gradio_client Client (one session, as a browser has), loop over a mix of
what a page and a script send: compare, generate and a small grid on the kit's LoRAs, an upload of a kit LoRA, a Hub
LoRA fetched with /hub_lora and then compared, a PNG dropped for its settings (sent as the page sends it: an upload,
then a join of the private event, read off the queue's event stream), and hostile ones: a Hub name never fetched, a
Hub file listed small but served large, a Hub card with 3,000 newlines of front matter, a 32 kB A1111 text, a
12,992x12,992 decompression-bomb PNG and a PNG whose zipped chunk inflates to 52 MB. Every outcome is kept; a
`Pinger` asks /gradio_api/info meanwhile; `footprint` reads the server's RSS and disk.

The Hub is tests/fake_hub.py's loopback fake (the real huggingface_hub client talks to it), with its LyingHub for the
file larger than listed; the hostile PNGs are tests/helpers.py's.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fake_hub as fh
import helpers
import httpx
import numpy as np
from gradio_client import handle_file
from huggingface_hub import constants
from PIL import Image

from fluxdemo import pipeline
from fluxdemo.pipeline import Model
from fluxdemo.pipeline.api import grid_cells
from fluxdemo.studio import read_request

STEPS, SIDE = 2, 16
PICKERS = ("", 1.0, "", 1.0, "", 1.0)  # the stack's rows below the first, empty (what a page sends)
CARD = b"---\ninstance_prompt: zkz style\n---\n"
LONG_CARD = b"---\n" + b"\n" * 3000 + b"instance_prompt: long card\n---\n"  # 3,000 newlines of front matter
LIAR = "bob/liar/l.safetensors"  # LyingHub lists it as 1,000 bytes and announces that; its CDN sends 3 MB more

# What each hostile request must answer: a sentence (the error's kind, then its text: a ValidationError is a request
# refused before it was queued), or the values it must set (a PNG's settings)
SENTENCES = {
    "hub-unfetched": r"^ValidationError: 1 parameter\(s\) failed validation:\n- request: The Hub LoRA soak/never is "
    r"not downloaded yet: a model job never downloads\.",
    "hub-liar": r"^AppError: bob/liar/l\.safetensors sent more than the [\d.]+ MB limit for a LoRA",
    "png-zip": r"^RuntimeError: png-zip\.png's 'fluxdemo' text is over 262,144 bytes, far more than any settings need",
}
PNG_SETTINGS = {  # (prompt, seed, steps, width) the PNG's text sets, and a warning that must come with it
    "png": (("a soak fox", 9, 3, 16), None),
    "png-long": (("a", 0, 1, 1024), "only the first"),
    "png-bomb": (("a bomb", 5, 20, 512), None),
}
MODEL_KINDS = ("compare", "generate", "grid", "hub")


def hub_repos(kit_loras: Path) -> dict[str, dict[str, bytes]]:
    """The fake Hub's repos: kit LoRAs, one with a 3,000-newline card, one never fetched, and the liar."""
    lora = {name: (kit_loras / f"{name}.safetensors").read_bytes() for name in ("peft", "kohya", "comfy")}
    return {
        "soak/style": {"style.safetensors": lora["peft"], "README.md": CARD},
        "soak/long-card": {"lc.safetensors": lora["comfy"], "README.md": LONG_CARD},
        "soak/never": {"n.safetensors": lora["kohya"]},
        "bob/liar": {"l.safetensors": lora["kohya"] + bytes(3 * 2**20)},
    }


@contextlib.contextmanager
def fake_hub(kit_loras: Path) -> Iterator[fh.LyingHub]:
    """The loopback Hub with hub_repos() in it (fake_hub.FILES restored afterwards); no token, not offline."""
    saved, offline = dict(fh.FILES), constants.HF_HUB_OFFLINE
    fh.FILES.update(hub_repos(kit_loras))
    constants.HF_HUB_OFFLINE = False
    hub = fh.LyingHub()
    try:
        yield hub
    finally:
        hub.stop()
        fh.FILES.clear()
        fh.FILES.update(saved)
        constants.HF_HUB_OFFLINE = offline


def use_hub(manager: Model, endpoint: str, cache: Path, quota_bytes: int, max_bytes: int) -> None:
    """Point a manager's LoRA library at the fake Hub, with a cache, a quota and a per-file limit of its own."""
    library = manager.adapters.library
    library.hub_endpoint, library.hub_cache = endpoint, cache
    library.hub_quota_bytes, library.hub_max_bytes = quota_bytes, max_bytes


def hostile_pngs(folder: Path) -> dict[str, Path]:
    """The PNGs a visitor drops: A1111 text, 32 kB of it, the 12,992x12,992 bomb and a 52 MB zipped chunk."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "png": helpers.png_with({"parameters": "a soak fox\nSteps: 3, Seed: 9, Size: 16x16, CFG scale: 3.5"}),
        "png-long": helpers.png_with({"parameters": "a\nSteps: 1, " + "a" * 32_000}),
        "png-bomb": helpers.png_bomb(),
        "png-zip": helpers.png_with(
            {"fluxdemo": '{"prompt": "' + "p" * 52_000_000 + '", "steps": -5}'}, zip_itxt=True
        ),  # fmt: skip
    }
    paths = {}
    for kind, png in data.items():
        paths[kind] = folder / f"{kind}.png"
        paths[kind].write_bytes(png)
    return paths


# --- the requests -------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    values: tuple | None  # a model request's handler values, for its solo run
    seconds: float
    error: str | None = None
    result: object = None
    logs: list[str] = field(default_factory=list)


def model_values(kind: str, i: int) -> tuple:
    """A model request's values in its handler's order; seeds and prompts repeat, so solo runs are few."""
    prompt, seed = f"soak {i % 3}: a lighthouse at dusk", 200 + i % 6
    if kind == "grid":
        return (prompt, "", "peft.safetensors\nxlabs.safetensors", "0, 1", str(seed), STEPS, 3.5, SIDE, SIDE,
                "", 1.0, *PICKERS)  # fmt: skip
    lora, strength = {
        "compare": (("peft.safetensors", "kohya.safetensors", "xlabs.safetensors")[i % 3], 0.5 + 0.5 * (i % 2)),
        "generate": ((None, "comfy.safetensors")[i % 2], 0.8),
        "hub": (("soak/style", "soak/long-card")[i % 2], 0.7),
    }[kind]
    return (prompt, lora, strength, seed, STEPS, 3.5, SIDE, SIDE, *PICKERS)


class Visitor:
    """One visitor: a gradio_client Client (its session) and an HTTP client for what a page sends raw."""

    def __init__(self, url: str, downloads: Path, pngs: dict[str, Path], kit_lora: Path) -> None:
        self.url = url.rstrip("/")
        self.client = helpers.open_client(url, download_files=str(downloads))
        self.http = httpx.Client(base_url=self.url, timeout=helpers.HANG_S)
        self.session = uuid.uuid4().hex[:12]
        self.pngs, self.kit_lora = pngs, kit_lora
        config = self.http.get("/config").json()
        self.png_fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "settings_from_png")

    def close(self) -> None:
        self.http.close()
        self.client.close()

    def send(self, kind: str, i: int) -> Outcome:
        start = time.perf_counter()
        values, logs, result = None, [], None
        try:
            if kind in MODEL_KINDS:
                values = model_values(kind, i)
                if kind == "hub":  # a script names a Hub LoRA: fetched first (its own queue group), then used
                    assert self.client.predict(values[1], api_name="/hub_lora") == values[1]
                result = self.client.predict(*values, api_name="/compare" if kind == "hub" else f"/{kind}")
            elif kind == "upload":
                result = self.client.predict(handle_file(self.kit_lora), api_name="/upload_lora")
            elif kind == "hub-unfetched":
                result = self.client.predict(*model_values("hub", 0)[:1], "soak/never", 1.0, 1, STEPS, 3.5, SIDE,
                                             SIDE, *PICKERS, api_name="/compare")  # fmt: skip
            elif kind == "hub-liar":
                result = self.client.predict(LIAR, api_name="/hub_lora")
            else:
                result, logs = self.drop_png(self.pngs[kind])
            error = None
        except Exception as e:  # kept, not raised: an error is one of the outcomes a soak counts
            error = f"{type(e).__name__}: {str(e).strip()[:300]}"
        return Outcome(kind, values, time.perf_counter() - start, error, result, logs)

    def drop_png(self, path: Path) -> tuple[list, list[str]]:
        """A PNG dropped on the page: uploaded, then the private settings_from_png event joined and its event stream
        read to the end -> (output values, warnings shown). An error raises RuntimeError with its sentence."""
        (stored,) = self.http.post("/gradio_api/upload", files=[("files", (path.name, path.read_bytes()))]).json()
        file = {"path": stored, "orig_name": path.name, "size": path.stat().st_size, "mime_type": "image/png",
                "meta": {"_type": "gradio.FileData"}}  # fmt: skip
        body = {"data": [file], "fn_index": self.png_fn, "session_hash": self.session, "event_data": None}
        joined = self.http.post("/gradio_api/queue/join", json=body)
        if joined.status_code != 200:
            raise RuntimeError(f"refused ({joined.status_code}): {joined.text[:300]}")
        event_id, logs = joined.json()["event_id"], []
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": self.session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("event_id") not in (None, event_id):
                    continue
                if message.get("msg") == "log":
                    logs.append(str(message.get("log")))
                elif message.get("msg") == "process_completed":
                    output = message.get("output") or {}
                    if not message.get("success"):
                        raise RuntimeError(str(output.get("error")))
                    return output["data"], logs
        raise RuntimeError("the event stream ended without a result")


def mix_of(hostile: bool) -> list[str]:
    kinds = ["compare", "png", "generate", "hub", "upload", "grid", "compare", "png-bomb", "generate"]
    if hostile:
        kinds += ["hub-unfetched", "png-long", "hub-liar", "png-zip"]
    return kinds


def soak(
    url: str,
    clients: int,
    pngs: dict[str, Path],
    kit_lora: Path,
    downloads: Path,
    *,
    requests_each: int | None = None,
    seconds: float | None = None,
    hostile: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """`clients` visitors at once, each sending the mix from its own offset, `requests_each` requests or until
    `seconds` have passed (what is running then finishes)."""
    mix, outcomes, lock = mix_of(hostile), [], threading.Lock()
    deadline = None if seconds is None else time.monotonic() + seconds

    def visitor(k: int) -> None:
        folder = downloads / f"client-{k}"
        folder.mkdir(parents=True, exist_ok=True)
        me = Visitor(url, folder, pngs, kit_lora)
        try:
            n = 0
            while (requests_each is None or n < requests_each) and (deadline is None or time.monotonic() < deadline):
                # Numbered k * 4 + n: visitors sending one kind send different values (LoRA, strength, prompt, seed),
                # so a mix-up shows (k * 7 + n gave every visitor the same values for a kind until the mix wrapped).
                outcome = me.send(mix[(k + n) % len(mix)], k * 4 + n)
                with lock:
                    outcomes.append(outcome)
                    if on_progress:
                        on_progress(len(outcomes))
                n += 1
        finally:
            me.close()

    threads = [threading.Thread(target=visitor, args=(k,), name=f"visitor-{k}") for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


# --- what came back -----------------------------------------------------------------------------------------------


def served(kind: str, result) -> list[np.ndarray]:
    """The images a model endpoint returned, in order (a grid's cells, as its second gallery lists them)."""
    if kind == "grid":
        return [np.asarray(Image.open(cell["image"]).convert("RGB")) for cell in result[1]]
    return helpers.served("compare" if kind == "hub" else kind, result)


def solo(manager: Model, kind: str, values: tuple) -> list[np.ndarray]:
    """The same request alone through the library, on a manager of its own, read as the handler reads it."""
    ask = read_request("compare" if kind == "hub" else kind, values)
    if kind == "grid":
        result = pipeline.grid(manager, ask.options, ask.prompts, ask.seeds, ask.stacks, ask.columns)
        return [np.asarray(result.images[label]) for label, _ in grid_cells(result.report)]  # as the gallery
    (stack,) = ask.stacks
    if kind == "generate":
        return [np.asarray(image) for image in pipeline.generate(manager, ask.options, stack).images.values()]
    return [np.asarray(image) for image in pipeline.compare(manager, ask.options, stack).images.values()]


def problems(outcomes: list[Outcome], clean: Model, lora_dir: Path, kit_lora: Path) -> dict[str, list[str]]:
    """What differs from what each request must answer: "mixups" (a model result not equal, pixel for pixel, to its
    solo run), "unanswered" (a hostile request without its sentence or settings), "errors" (anything else failing)."""
    expected: dict[tuple, list[np.ndarray]] = {}
    found: dict[str, list[str]] = {"mixups": [], "unanswered": [], "errors": []}
    for o in outcomes:
        what = f"{o.kind} {o.values[:4] if o.values else ''}"
        if o.kind in SENTENCES:
            if o.error is None or not re.search(SENTENCES[o.kind], o.error):
                found["unanswered"].append(f"{what}: {o.error or o.result!r}"[:400])
        elif o.error is not None:
            found["errors"].append(f"{what}: {o.error}")
        elif o.kind in MODEL_KINDS:
            key = (o.kind, o.values)
            if key not in expected:
                expected[key] = solo(clean, o.kind, o.values)
            if not helpers.same(served(o.kind, o.result), expected[key]):
                found["mixups"].append(what)
        elif o.kind == "upload":
            if (lora_dir / o.result).read_bytes() != kit_lora.read_bytes():
                found["mixups"].append(f"{what}: stored as {o.result}, another file")
        elif o.kind in PNG_SETTINGS:
            settings, warning = PNG_SETTINGS[o.kind]
            prompt, seed, steps, _, width = o.result[:5]
            if (prompt, seed, steps, width) != settings or (warning and not any(warning in x for x in o.logs)):
                found["unanswered"].append(f"{what}: {o.result[:6]!r}, warnings {o.logs!r}"[:400])
    return found


def error_counts(outcomes: list[Outcome]) -> dict[str, int]:
    """Errors by kind and message (numbers in the message kept: they are the limits)."""
    return dict(Counter(f"{o.kind}: {o.error}"[:200] for o in outcomes if o.error))


# --- the server meanwhile -----------------------------------------------------------------------------------------


class Pinger(threading.Thread):
    """GET /gradio_api/info every `every` seconds until stopped: each answer's latency, and any failure."""

    def __init__(self, url: str, every: float = 0.25) -> None:
        super().__init__(name="pinger", daemon=True)
        self.url, self.every = url.rstrip("/"), every
        self.latencies: list[float] = []
        self.failures: Counter[str] = Counter()
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=helpers.HANG_S) as http:
            while not self._halt.is_set():
                start = time.perf_counter()
                try:
                    response = http.get("/gradio_api/info")
                    response.raise_for_status()
                    self.latencies.append(time.perf_counter() - start)
                except Exception as e:  # counted: a ping that fails is what this watches for
                    self.failures[f"{type(e).__name__}: {str(e)[:120]}"] += 1
                self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=helpers.HANG_S)

    def summary(self) -> dict:
        lat = self.latencies
        return {
            "pings": len(lat),
            "failures": dict(self.failures),
            "max_s": max(lat, default=float("nan")),
            "p99_s": float(np.percentile(lat, 99)) if lat else float("nan"),
            "p50_s": float(np.percentile(lat, 50)) if lat else float("nan"),
            "over_1s": sum(x > 1 for x in lat),
        }


def du(folder: Path) -> int:
    """Bytes of the regular files under `folder` (0 when it does not exist)."""
    total = 0
    for path in Path(folder).rglob("*") if Path(folder).exists() else ():
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def footprint(folders: dict[str, Path]) -> dict[str, int]:
    """The server's resident memory (this process: the server runs in it) and each folder's bytes."""
    import hostile

    return {"rss_bytes": hostile.rss_bytes(), **{f"{name}_bytes": du(path) for name, path in folders.items()}}
