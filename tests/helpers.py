"""Builders the tests share: the one way a test opens a model, the CLI run in this process, a studio launched on
loopback and the request mix sent to it, and hand-made PNGs. LoRA files and their references are in
tests/lora_factory.py, the fake Hub in tests/fake_hub.py, hostile files in tests/hostile.py. Test modules import
these, never each other."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gradio_client import Client
from PIL import Image, PngImagePlugin

from fluxdemo.lora import LoraReport
from fluxdemo.model.presets import Preset, get_preset
from fluxdemo.pipeline import GenerateOptions, Model, compare, generate, sweep
from fluxdemo.pipeline.limits import DEFAULT_LIMITS, Limits
from fluxdemo.studio import build_studio

ROOT = Path(__file__).resolve().parents[1]

# --- hang guards: how long a test waits before it calls something hung -----------------------------------------------
# Never speed limits (timings belong in bench/): each sits far above what a 2-core machine running two busy loops
# beside the suite needs, so load never trips one, while a real hang still ends its test with a sentence saying what
# it waited for. pyproject.toml's pytest-timeout (1200 s a test, its fixtures' set-up included) is above them all.
HANG_S = 300  # one answer: a request to an app, a job's first step, a download, a thread's end, an app's exit
START_S = 600  # a process that imports torch and the app (app.py up, a CLI or script in a subprocess)
WAIT_MS = HANG_S * 1000  # HANG_S for Playwright, which counts in milliseconds: a page's answer to a click
LONG_TEST_S = 1800  # pytest-timeout for a module whose tests each start an app and make several runs (browsers)


def tiny_model(lora_dir: Path | None = None, preset: str | Preset = "tiny", **kwargs) -> Model:
    """A Model on the CPU over a kit preset (the environment's overrides ignored), as the app opens one."""
    if isinstance(preset, str):
        preset = get_preset(preset, use_env=False)
    if lora_dir is not None:
        kwargs["lora_dir"] = lora_dir
    return Model(preset, **{"device": "cpu", **kwargs})


# --- the CLI in this process ----------------------------------------------------------------------------------------

LIBRARIES = ("diffusers", "transformers", "httpx", "huggingface_hub", "gguf", "peft")  # the CLI quiets them


@dataclass
class Done:
    """A CLI run: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


@contextmanager
def library_log_levels_kept() -> Iterator[None]:
    """The log levels the CLI sets on LIBRARIES put back afterwards, as the rest of the session had them."""
    levels = {name: logging.getLogger(name).level for name in LIBRARIES}
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# --- the studio on loopback, and the mix of requests strangers send it ----------------------------------------------

SIZE = dict(steps=2, width=16, height=16)
MAX_UPLOAD = 2**20

# (endpoint, LoRA or None, strength): every LoRA of the kit, strengths from off to over-driven, and plain images
MIX = [
    ("compare", "peft.safetensors", 0.5),
    ("generate", None, 1.0),
    ("compare", "kohya.safetensors", 1.0),  # also adapts CLIP: the prompt embeddings depend on it
    ("generate", "comfy.safetensors", 0.8),
    ("compare", "xlabs.safetensors", 1.5),
    ("generate", "kohya.safetensors", 0.3),
    ("compare", "comfy.safetensors", 0.0),
    ("sweep", "peft.safetensors", "0, 0.7, 1.4"),
]


def options(i: int) -> GenerateOptions:
    return GenerateOptions(f"request {i % 5}: a lighthouse at dusk", seed=100 + i, guidance=3.5, **SIZE)


def api_args(o: GenerateOptions, lora: str | None, strength) -> tuple:
    return o.prompt, lora, strength, o.seed, o.steps, o.guidance, o.width, o.height


def alone(manager: Model, endpoint: str, o: GenerateOptions, lora: str | None, strength) -> list[np.ndarray]:
    """The library's own result for one request, as the images the endpoint returns, in order."""
    if endpoint == "compare":
        images = compare(manager, o, lora, strength).images
    elif endpoint == "sweep":
        images = sweep(manager, o, lora, [float(s) for s in strength.split(",")]).images
    else:
        images = generate(manager, o, lora, strength).images
    return [np.asarray(image) for image in images.values()]


def served(endpoint: str, result) -> list[np.ndarray]:
    """The images of a gradio_client result, read from the PNGs it downloaded."""
    first = result[0]
    if endpoint == "compare":
        paths = list(first)
    elif endpoint == "sweep":
        paths = [item["image"] for item in first]
    else:
        paths = [first]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def open_client(url: str, **kwargs) -> Client:
    """A gradio_client Client (one session, as one browser has) that waits up to HANG_S for each answer (its own
    default, httpx's 5 s, is less than an in-process server takes beside a running model)."""
    return Client(url, verbose=False, httpx_kwargs={"timeout": HANG_S}, **kwargs)


@contextmanager
def launched(manager: Model, queue_size: int, limits: Limits = DEFAULT_LIMITS, public: bool = False) -> Iterator[str]:
    """The studio over `manager` on 127.0.0.1 (uploads bounded by MAX_UPLOAD); its URL."""
    demo = build_studio(manager, max_upload_bytes=MAX_UPLOAD, queue_size=queue_size, limits=limits, public=public)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, max_file_size=MAX_UPLOAD)
    try:
        yield demo.local_url
    finally:
        demo.close()


# --- a real browser (Playwright, imported only by the tests that drive one) ----------------------------------------

PLAYWRIGHT_DEFAULT_MS = 5_000  # Playwright's own wait, put back for the modules after


@contextmanager
def patient_browser(launch: Callable) -> Iterator:
    """The chromium `launch(playwright)` starts; while it is open every expectation waits up to WAIT_MS, since a busy
    machine answers late, never wrongly."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    try:
        with sync_playwright() as p:
            chromium = launch(p)
            yield chromium
            chromium.close()
    finally:
        expect.set_options(timeout=PLAYWRIGHT_DEFAULT_MS)


def open_page(browser, url: str, viewport: dict):
    """The app's page in a fresh browser context (a new visitor's), whose clicks and fills wait as long as the
    expectations."""
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    return page


# --- PNGs a visitor drops ------------------------------------------------------------------------------------------


def png_with(text_chunks: dict[str, str], size: tuple[int, int] = (16, 16), zip_itxt: bool = False) -> bytes:
    """A black PNG carrying these text chunks (tEXt, or zipped iTXt)."""
    info = PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        info.add_itxt(key, value, zip=True) if zip_itxt else info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 12_992) -> bytes:
    """A 1-bit PNG of side x side pixels (21 MB once decoded) in a few tens of kB, with A1111 parameters."""
    row, deflate = b"\0" * (1 + (side + 7) // 8), zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    text = b"parameters\0a bomb\nSteps: 20, Seed: 5, Size: 512x512"
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"tEXt", text) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))  # fmt: skip


def card_report(**fields) -> LoraReport:
    """A LoRA report for the card, every field given; `fields` override."""
    report = {
        "name": "style.safetensors", "format": "kohya", "naming": "kohya", "compatible": True, "rank": 4,
        "alpha": 4.0, "scale": 1.0, "size": 10**6, "targets": 8, "modules": {"double blocks": 8},
        "text_encoder": False, "t5": False, "base_model_hint": "", "trigger_words": [], "problems": [],
        "warnings": [], "metadata": {}, "matched": [], "unmatched": [], "sha256": "0" * 64,
    }  # fmt: skip
    return LoraReport(**{**report, **fields})
