"""`python app.py --model tiny` as a user starts it, and one real browser (Debian's chromium, driven by Playwright)
running a compare on it.

No wall-clock limits: every wait is tests/helpers.py's generous WAIT_MS, so a loaded 2-core machine passes too. One
chromium serves the module; each test opens its own page, except the A/B tests, which act in file order on one page
holding three runs (the `ab` fixture) so that those runs are made once."""

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
from helpers import HANG_S, LONG_TEST_S, START_S, WAIT_MS, open_page, patient_browser

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(LONG_TEST_S)  # the first test also waits for app.py to start, on a loaded machine
LAPTOP = {"width": 1280, "height": 800}
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
                assert time.monotonic() - start < START_S, f"app.py never answered in {START_S} s; see {log.name}"
                time.sleep(0.1)
        yield url, Path(log.name)
    finally:
        app.terminate()
        app.wait(timeout=HANG_S)
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


@pytest.fixture(scope="module")
def browser(served):
    """One headless chromium for the module's pages."""

    def launch(playwright):
        return playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)

    with patient_browser(launch) as chromium:
        yield chromium


@pytest.fixture
def page(browser, served):
    """The served app's page, 1280x800, for one test."""
    page = open_page(browser, served[0], LAPTOP)
    yield page
    page.context.close()


def test_compare_in_a_real_browser(browser, served, tmp_path):
    from playwright.sync_api import expect

    page = open_page(browser, served[0], {"width": 1280, "height": 900})
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
    page.context.close()


def wait_for_line(log: Path, pattern: re.Pattern, timeout: float = WAIT_MS / 1000) -> str:
    """The first line of the app's log that matches, waiting for it to be written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in log.read_text().splitlines() if pattern.search(line)]
        if found:
            return found[-1]
        time.sleep(0.1)
    raise AssertionError(f"no line matching {pattern.pattern!r} in {log} within {timeout} s")


# Run 1 made #1 (baseline) and #2 (LoRA); run 3 made #5 and #6: the caption of #2 against #6 on the slider.
AB_CAPTION = re.compile(r"left #2: \S+ · right #6: \S+ — seed: 0 → 2$")


@pytest.fixture(scope="module")
def ab(browser, served):
    """One page for the A/B tests, which run on it in file order: three Compare runs (seeds 0, 1, 2), then run 1's
    LoRA image picked on the left against run 3's, with "Show where they differ" ticked. Each test leaves that pair on
    the slider, which is what the next one checks is kept."""
    page = open_page(browser, served[0], LAPTOP)
    page.get_by_label("Prompt").fill("a lighthouse on a rocky island")
    for seed in (0, 1, 2):
        page.get_by_label("Seed").fill(str(seed))
        page.get_by_role("button", name="Compare", exact=True).click()
        page.get_by_text(f"Seed {seed}", exact=True).wait_for()
    page.get_by_label("Left (A)").click()
    page.get_by_role("option", name=re.compile(r"^#2 · run 1 ")).click()
    page.get_by_label("Show where they differ").check()
    page.keyboard.press("Escape")
    yield page
    page.context.close()


def compare_button(page):
    return page.get_by_role("button", name="Compare", exact=True)


def long_runs(page) -> None:
    """100 steps at 768x768: long enough on any machine for a Cancel to land mid-run."""
    for name, value in (("Steps", "100"), ("Width", "768"), ("Height", "768")):
        field = page.get_by_label(f"number input for {name}")
        field.fill(value)
        field.press("Tab")


def test_a_b_shows_run_1s_lora_image_against_run_3s_and_where_they_differ(ab, tmp_path):
    from playwright.sync_api import expect

    expect(ab.get_by_text(AB_CAPTION)).to_be_visible()
    expect(ab.get_by_text("Where #2 and #6 differ (brighter: more)")).to_be_visible()
    ab.wait_for_timeout(500)  # the difference image settles before the screenshot
    shot = tmp_path / "ab.png"
    ab.screenshot(path=shot, full_page=True)
    assert shot.stat().st_size > 10_000


def test_an_error_says_its_sentence_beside_the_result_and_the_a_b_pair_stays(ab):
    from playwright.sync_api import expect

    lora = ab.get_by_label("LoRA", exact=True)
    chosen = lora.input_value()
    lora.fill("no-such-lora.safetensors")
    lora.press("Enter")
    try:
        compare_button(ab).click()
        refused = ab.get_by_text(re.compile("^Not run: No LoRA named 'no-such-lora.safetensors'"))
        expect(refused).to_be_visible()
        expect(ab.get_by_text(AB_CAPTION)).to_be_visible()
    finally:  # the next tests run with the LoRA the runs had
        lora.fill(chosen)
        lora.press("Enter")


def test_cancel_mid_run_stops_the_job_and_the_a_b_pair_stays(ab, served):
    """While the job runs the button says so and the progress is in view; after Cancel the work stops."""
    from playwright.sync_api import expect

    long_runs(ab)
    expect(ab.get_by_text(re.compile("The result on screen belongs to other settings"))).to_be_visible()
    compare = compare_button(ab)
    compare.click()
    expect(compare).to_be_disabled()
    expect(ab.get_by_text(re.compile(r"image \d+ of 2 · \S+ · step \d+/100")).first).to_be_in_viewport()
    ab.get_by_role("button", name="Cancel").click()
    wait_for_line(served[1], re.compile(r"Cancelled during the \w+ image, after step \d+ of 100\."))  # it stopped
    expect(compare).to_be_enabled()
    expect(ab.get_by_text(AB_CAPTION)).to_be_visible()


@pytest.mark.parametrize(("button", "first"), [("Sweep strengths", "strength 0"), ("Grid", "p1 seed 0 row 1 x0")])
def test_a_runs_progress_is_in_view_without_scrolling_and_cancel_keeps_the_a_b_pair(ab, served, button, first):
    """Sweep and Grid (6 images each) at 1280x800: the progress shows where the user is looking, the page not
    scrolled by the test; after Cancel, the Compare tab still shows the pair."""
    from playwright.sync_api import expect

    long_runs(ab)
    ab.evaluate("window.scrollTo(0, 0)")
    ab.get_by_role("button", name=button, exact=True).click()
    progress = ab.get_by_text(re.compile(r"image \d+ of 6 · .* · step \d+/100"))
    expect(progress.first).to_be_in_viewport()
    assert ab.evaluate("window.scrollY") == 0
    ab.get_by_role("button", name="Cancel").click()
    wait_for_line(served[1], re.compile(rf"Cancelled during the {first} image, after step \d+ of 100\."))
    expect(compare_button(ab)).to_be_enabled()
    ab.get_by_role("tab", name="Compare").click()
    expect(ab.get_by_text(AB_CAPTION)).to_be_visible()


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
            expect(page.get_by_text("not a safetensors file at all").first).to_be_visible()
            expect(lora).to_have_value(before)
            expect(lora).to_be_enabled()
    expect(lora).to_have_value("my_style.safetensors")
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
    expect(page.get_by_text("bob/a-model has no LoRA: none of its .safetensors files").first).to_be_visible()
    expect(lora).to_have_value(before)

    box.fill("https://huggingface.co/bob/style-lora")
    page.get_by_role("button", name="Use a LoRA from the Hub").click()
    expect(lora).to_have_value("https://huggingface.co/bob/style-lora")
    expect(page.get_by_role("heading", name="bob/style-lora/style.safetensors")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Trigger words: zkz style$"))).to_be_visible()
    page.get_by_role("button", name="Insert trigger words into the prompt").click()
    expect(page.get_by_label("Prompt")).to_have_value(re.compile("zkz style"))
    lora_file = fh.FILES["bob/style-lora"]["style.safetensors"]
    assert ("GET", f"/cdn/{fh.sha256(lora_file)}") in fake_hub.requests  # the app's Hub was the fake one
