"""`python app.py --model tiny` as a user starts it, and one real browser (Debian's chromium, driven by Playwright)
running a compare on it."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import fake_hub as fh
import lora_factory as lf
import pytest
from conftest import FAILED

ROOT = Path(__file__).resolve().parents[1]
WAIT_MS = 120_000  # how long a page may take to show what a step leads to: a hang guard for a busy machine
START_GUARD_S = 300  # a hang guard for imports on a busy machine; how fast the page is up is bench/startup.py's
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

# The slider's own two images: the history strip below it shows the same files, a moment later or sooner.
SLIDER_IMAGES = """() => {
    const images = [...document.querySelectorAll("#slider img[src$='/baseline.png'], #slider img[src$='/lora.png']")];
    const ready = images.length === 2 && images.every(i => i.complete && i.naturalWidth > 0);
    return ready && images.map(i => [i.src.split("/").pop(), i.naturalWidth, i.naturalHeight]);
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_hub(tiny_kit, tmp_path_factory):
    """The loopback fake Hub with a LoRA repo (a kit LoRA whose trigger words are in the model card) and a
    repo holding only a model, for the studio's Hub box."""
    plain = tmp_path_factory.mktemp("hub-lora") / "style.safetensors"
    lf.save(plain, lf.load(tiny_kit / "loras" / "peft.safetensors"))  # no metadata: the card's trigger words count
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fh.FILES, "bob/style-lora", {"style.safetensors": plain.read_bytes(), "README.md": fh.CARD})
        mp.setitem(fh.FILES, "bob/a-model", {"model.safetensors": fh.safetensors_bytes({"model.embed.weight": 64})})
        hub = fh.FakeHub()
        yield hub
        hub.stop()


@pytest.fixture(scope="module")
def served(tiny_kit, fake_hub, tmp_path_factory):
    """The app in its own process on a free port: (url, its log file). Its Hub is the fake one on loopback, with a
    cache of its own and no token: nothing leaves the machine, nothing of the machine's Hugging Face setup comes in."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    folder = tmp_path_factory.mktemp("app")
    log = (folder / "app.log").open("w")
    shutil.copytree(tiny_kit / "loras", folder / "loras")  # uploads land in a copy, never in the shared kit
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env |= {  # FLUXDEMO_CACHE: conftest's
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": fake_hub.endpoint,
        "HF_HUB_CACHE": str(folder / "hf-cache"),
        "HF_TOKEN_PATH": str(folder / "no-token"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    start = time.monotonic()
    command = [sys.executable, "app.py", "--model", "tiny", "--port", str(port), "--lora-dir", str(folder / "loras")]
    app = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as page:
                    if page.status == 200:
                        break
            except OSError:
                assert app.poll() is None, f"app.py exited with {app.returncode}; see {log.name}"
                assert time.monotonic() - start < START_GUARD_S, f"app.py never answered; see {log.name}"
                time.sleep(0.1)
        yield url, Path(log.name)
    finally:
        app.terminate()
        app.wait(timeout=30)
        log.close()


@pytest.fixture(autouse=True)
def app_log_on_failure(request, served):
    """A failed browser test shows the end of the app's log: on CI it is all there is to go on."""
    yield
    if request.node.stash.get(FAILED, False):
        print(f"--- the last lines of {served[1]} ---", *served[1].read_text().splitlines()[-60:], sep="\n")


def chromium_path() -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: as root run `apt-get install -y chromium` (CI does this).")
    return chromium


@pytest.fixture
def page(served):
    """The served app's page in a headless chromium, 1280x800."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(served[0])
        yield page
        browser.close()


def test_compare_in_a_real_browser(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )  # fmt: skip
        page = browser.new_page()
        page.goto(url)
        page.get_by_label("Prompt").fill("a photo of a cat sitting on a wooden table, soft window light")
        page.get_by_label("Prompt").press("Enter")  # Enter runs Compare
        # Both images of the slider, loaded: baseline.png and lora.png at the tiny preset's 256x256.
        loaded = page.wait_for_function(SLIDER_IMAGES, timeout=WAIT_MS).json_value()
        assert sorted(loaded) == [["baseline.png", 256, 256], ["lora.png", 256, 256]]
        expect(page.get_by_role("row", name=re.compile(r"^side_by_side\.png"))).to_be_visible()  # the downloads
        expect(page.get_by_text("Seed 0", exact=True)).to_be_visible()  # the run panel
        page.wait_for_timeout(500)  # the stage chart draws after its data arrives
        screenshot = tmp_path / "screenshot.png"  # the README's come from scripts/screenshots.py
        page.screenshot(path=screenshot, full_page=True)
        assert screenshot.stat().st_size > 10_000
        browser.close()


def wait_for_line(log: Path, pattern: re.Pattern, timeout: float = WAIT_MS / 1000) -> str:
    """The first line of the app's log that matches, waiting for it to be written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in log.read_text().splitlines() if pattern.search(line)]
        if found:
            return found[-1]
        time.sleep(0.1)
    raise AssertionError(f"no line matching {pattern.pattern!r} in {log} within {timeout} s")


def test_history_ab_errors_cancel_and_progress_in_a_real_browser(served, page, tmp_path):
    """Three runs, then run 1's LoRA image against run 3's on the slider; an error and a Cancel leave that on screen;
    Sweep and Grid show their progress in view, at 1280x800, without scrolling."""
    from playwright.sync_api import expect

    log = served[1]
    page.get_by_label("Prompt").fill("a lighthouse on a rocky island")
    compare = page.get_by_role("button", name="Compare", exact=True)
    for seed in (0, 1, 2):
        page.get_by_label("Seed").fill(str(seed))
        compare.click()
        page.get_by_text(f"Seed {seed}", exact=True).wait_for(timeout=WAIT_MS)
    # Run 1 made #1 (baseline) and #2 (LoRA); run 3 made #5 and #6, which the slider shows now.
    page.get_by_label("Left (A)").click()
    page.get_by_role("option", name=re.compile(r"^#2 · run 1 ")).click()
    label = re.compile(r"left #2: \S+ · right #6: \S+ — seed: 0 → 2$")
    expect(page.get_by_text(label)).to_be_visible()
    page.get_by_label("Show where they differ").check()
    expect(page.get_by_text("Where #2 and #6 differ (brighter: more)")).to_be_visible()
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    shot = tmp_path / "ab.png"
    page.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 10_000
    shown = page.get_by_text(label)

    # An error: the sentence appears, and the pair on screen stays.
    lora = page.get_by_label("LoRA", exact=True)
    chosen = lora.input_value()
    lora.fill("no-such-lora.safetensors")
    lora.press("Enter")
    compare.click()
    refused = page.get_by_text(re.compile("^Not run: No LoRA named 'no-such-lora.safetensors'"))  # beside the result
    expect(refused).to_be_visible(timeout=WAIT_MS)
    expect(shown).to_be_visible()
    lora.fill(chosen)
    lora.press("Enter")

    # Cancel mid-run: the buttons say a job runs, and afterwards the pair on screen is still there.
    # 100 steps at 768x768: long enough on any machine for the Cancel to land mid-run
    for name, value in (("Steps", "100"), ("Width", "768"), ("Height", "768")):
        field = page.get_by_label(f"number input for {name}")
        field.fill(value)
        field.press("Tab")
    expect(page.get_by_text(re.compile("The result on screen belongs to other settings"))).to_be_visible()
    compare.click()
    expect(compare).to_be_disabled()
    progress = page.get_by_text(re.compile(r"image \d+ of 2 · \S+ · step \d+/100"))
    expect(progress.first).to_be_in_viewport(timeout=WAIT_MS)
    page.get_by_role("button", name="Cancel").click()
    wait_for_line(log, re.compile(r"Cancelled during the \w+ image, after step \d+ of 100\."))  # the work stopped
    expect(compare).to_be_enabled(timeout=WAIT_MS)
    expect(shown).to_be_visible()

    # Sweep and Grid: progress where the user is looking, the page not scrolled by the test.
    for button, total, first in (("Sweep strengths", 6, "strength 0"), ("Grid", 6, "p1 seed 0 row 1 x0")):
        page.evaluate("window.scrollTo(0, 0)")
        page.get_by_role("button", name=button, exact=True).click()
        progress = page.get_by_text(re.compile(rf"image \d+ of {total} · .* · step \d+/100"))
        expect(progress.first).to_be_in_viewport(timeout=WAIT_MS)
        assert page.evaluate("window.scrollY") == 0
        page.get_by_role("button", name="Cancel").click()
        wait_for_line(log, re.compile(rf"Cancelled during the {first} image, after step \d+ of 100\."))
        expect(compare).to_be_enabled(timeout=WAIT_MS)
    page.get_by_role("tab", name="Compare").click()
    expect(shown).to_be_visible()  # after an error and three Cancels, run 1 against run 3 is still on the slider


def test_uploads_keep_the_picker_and_the_list_is_current_in_a_real_browser(page, tmp_path, tiny_kit):
    """A file that is not safetensors: its sentence, and the LoRA picker as it was. A good upload: picked, and listed
    again after a reload of the page."""
    from playwright.sync_api import expect
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "notes.safetensors"
    bad.write_text("trigger: ohwx, trained on my dog")
    good = tmp_path / "my_style.safetensors"
    save_file(load_file(tiny_kit / "loras" / "peft.safetensors"), good, metadata={"ss_output_name": "my style"})
    lora = page.get_by_label("LoRA", exact=True)
    before = lora.input_value()
    assert before.endswith(".safetensors")
    for file in (bad, good):
        with page.expect_file_chooser() as chooser:
            page.get_by_role("button", name="Upload a .safetensors LoRA").click()
        chooser.value.set_files(file)
        if file is bad:
            expect(page.get_by_text("not a safetensors file at all").first).to_be_visible(timeout=WAIT_MS)
            expect(lora).to_have_value(before)
            expect(lora).to_be_enabled()
    expect(lora).to_have_value("my_style.safetensors", timeout=WAIT_MS)
    page.reload()
    lora = page.get_by_label("LoRA", exact=True)
    lora.click()
    expect(page.get_by_role("option", name="my_style.safetensors")).to_be_visible()


def test_the_hub_box_in_a_real_browser(page, fake_hub):
    """A repo without a LoRA: its sentence, and the picker as it was. A Hub URL: downloaded from the (fake) Hub,
    picked, its card shows the model card's trigger words, and they go into the prompt."""
    from playwright.sync_api import expect

    lora = page.get_by_label("LoRA", exact=True)
    before = lora.input_value()
    box = page.get_by_label("A LoRA from the Hugging Face Hub")
    box.fill("bob/a-model")
    box.press("Enter")
    expect(page.get_by_text("bob/a-model has no LoRA: none of its .safetensors files").first).to_be_visible(
        timeout=WAIT_MS
    )
    expect(lora).to_have_value(before)

    box.fill("https://huggingface.co/bob/style-lora")
    page.get_by_role("button", name="Use a LoRA from the Hub").click()
    expect(lora).to_have_value("https://huggingface.co/bob/style-lora", timeout=WAIT_MS)
    expect(page.get_by_role("heading", name="bob/style-lora/style.safetensors")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Trigger words: zkz style$"))).to_be_visible()
    page.get_by_role("button", name="Insert trigger words into the prompt").click()
    expect(page.get_by_label("Prompt")).to_have_value(re.compile("zkz style"))
    lora_file = fh.FILES["bob/style-lora"]["style.safetensors"]
    assert ("GET", f"/cdn/{fh.sha256(lora_file)}") in fake_hub.requests  # the app's Hub was the fake one
