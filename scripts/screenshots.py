"""The README's screenshots of the studio, at a laptop's size and a phone's: `python scripts/screenshots.py`.

Starts `python app.py --model tiny` on a free port, runs one Compare in Debian's chromium (Playwright, no browser
download) at each size, and writes docs/screenshot.png (1280x800), docs/screenshot-phone.png (390x844) and
docs/ab-compare.png (two results on the slider, with their difference map) as small palette PNGs. The browser
tests start the app with `serve` from here.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"screenshot.png": (1280, 800), "screenshot-phone.png": (390, 844)}
PROMPT = "a watercolor painting of a lighthouse on a rocky island at sunset"
START_WAIT_S = 300  # generous: a first start builds the tiny kit, and a busy machine imports slowly
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
# The slider's own two images, loaded and other than `previous` (the history strip below shows the same files).
SLIDER_IMAGES = """(previous) => {
    const images = [...document.querySelectorAll("#slider img[src$='/baseline.png'], #slider img[src$='/lora.png']")];
    const ready = images.length === 2 && images.every(i => i.complete && i.naturalWidth > 0);
    const sources = images.map(i => i.src);
    return ready && sources.join() !== previous.join() && sources;
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(log: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`python app.py --model tiny FLAGS` on a free loopback port, offline -> its URL once the page answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **(env or {})}
    command = [sys.executable, "app.py", "--model", "tiny", "--port", str(port), *flags]
    with log.open("w") as out:
        app = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_WAIT_S
            while not _answers(url):
                if app.poll() is not None:
                    raise RuntimeError(f"app.py exited with {app.returncode}; see {log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"app.py did not answer within {START_WAIT_S} s; see {log}")
                time.sleep(0.2)
            yield url
        finally:
            app.terminate()
            app.wait(timeout=60)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as page:
            return page.status == 200
    except OSError:
        return False


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("chromium is not installed: as root run `apt-get install -y chromium`.")
    return path


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS)


def run_compare(page, prompt: str = PROMPT, wait_ms: int = 300_000, previous: list[str] = ()) -> list[str]:
    """Type the prompt, press Compare -> the slider's two new image URLs once both have loaded."""
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_role("button", name="Compare", exact=True).click()
    return page.wait_for_function(SLIDER_IMAGES, arg=list(previous), timeout=wait_ms).json_value()


def small_png(path: Path) -> None:
    """A screenshot as a 128-colour PNG: a fifth of the size, and no visible loss on a UI."""
    Image.open(path).convert("RGB").quantize(128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def ab_compare(page, first: list[str]) -> None:
    """A second compare at another seed, then run 1's LoRA image against it on the slider, with the difference map."""
    page.get_by_label("Seed").fill("2")
    run_compare(page, previous=first)
    page.get_by_label("Left (A)").click()
    page.get_by_role("option", name=re.compile(r"^#2 · run 1 ")).click()
    page.get_by_label("Show where they differ").check()
    page.get_by_text("Where #2 and #4 differ (brighter: more)").wait_for()


def save(shoot: Callable, path: Path) -> None:
    shoot(path=path)
    small_png(path)
    print(f"{path}: {path.stat().st_size / 1e3:.0f} KB")


def main() -> int:
    from playwright.sync_api import sync_playwright

    docs = ROOT / "docs"
    log = Path(tempfile.mkdtemp(prefix="fluxdemo-screenshots-")) / "app.log"
    # online as a user runs it (the tiny model downloads nothing): no offline notice in the pictures
    with serve(log, env={"HF_HUB_OFFLINE": "0"}) as url, sync_playwright() as p:
        browser = launch(p)
        for name, (width, height) in SIZES.items():
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            first = run_compare(page)
            page.wait_for_timeout(800)  # the stage chart draws after its data arrives
            save(page.screenshot, docs / name)
            if name == "screenshot.png":  # and the A/B view on the laptop: the results column only
                ab_compare(page, first)
                top, bottom = page.locator("#results").bounding_box(), page.locator("#difference").bounding_box()
                scrolled = page.evaluate("window.scrollY")  # boxes are the viewport's; a full-page clip, the page's
                area = {**top, "y": top["y"] + scrolled, "height": bottom["y"] + bottom["height"] - top["y"]}
                save(functools.partial(page.screenshot, clip=area, full_page=True), docs / "ab-compare.png")
            page.close()
        browser.close()
    shutil.rmtree(log.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
