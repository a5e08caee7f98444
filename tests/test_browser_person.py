"""The studio as a person meets it, in a real browser (Debian's chromium, driven by Playwright): a refused request
and a Cancel leave the result on the slider and say what happened beside it, and on a phone the result comes into
view after Compare. The app is `python app.py --model tiny`, started by scripts/screenshots.py's `serve`.

No wall-clock limits: the waits are generous, so a loaded 2-core machine passes too."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import lora_factory as lf
import pytest
from helpers import LONG_TEST_S, WAIT_MS, open_page, patient_browser  # WAIT_MS: generous, never a timing

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("screenshots", ROOT / "scripts" / "screenshots.py")
screenshots = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screenshots)

pytestmark = pytest.mark.timeout(LONG_TEST_S)  # several runs a test, each on a loaded machine
PHONE = {"width": 390, "height": 844}
LAPTOP = {"width": 1280, "height": 800}


@pytest.fixture(scope="module")
def url(tiny_kit, tmp_path_factory):
    """The app over a copy of the kit's LoRAs plus an SDXL LoRA (readable, but not for FLUX)."""
    folder = tmp_path_factory.mktemp("person")
    shutil.copytree(tiny_kit / "loras", folder / "loras")
    lf.sdxl_kohya(folder / "loras" / "sdxl.safetensors")
    with screenshots.serve(folder / "app.log", "--lora-dir", str(folder / "loras")) as address:
        yield address


@pytest.fixture(scope="module")
def browser(url):
    with patient_browser(screenshots.launch) as chromium:
        yield chromium


def slider_images(page) -> list[str]:
    return page.wait_for_function(screenshots.SLIDER_IMAGES, arg=[], timeout=WAIT_MS).json_value()


def pick_lora(page, name: str) -> None:
    lora = page.get_by_label("LoRA", exact=True)
    lora.fill(name)
    lora.press("Enter")


def test_a_refused_compare_keeps_the_result_and_says_why(browser, url):
    """An SDXL LoRA on a FLUX model: refused before the job, with its sentence beside the result, which stays."""
    from playwright.sync_api import expect

    page = open_page(browser, url, LAPTOP)
    before = screenshots.run_compare(page, wait_ms=WAIT_MS)
    pick_lora(page, "sdxl.safetensors")
    page.get_by_role("button", name="Compare", exact=True).click()
    note = page.get_by_text(re.compile(r"^Not run: sdxl\.safetensors cannot be applied to this model: "))
    expect(note).to_be_visible(timeout=WAIT_MS)
    expect(note).to_contain_text("The result on screen stays as it was.")
    assert slider_images(page) == before
    expect(page.locator("#slider")).not_to_contain_text("Error")
    expect(page.get_by_role("button", name="Compare", exact=True)).to_be_enabled()
    page.close()


def test_cancel_after_picking_a_pair_keeps_it(browser, url):
    """Two runs, #2 against #4 with their difference shown; Cancel then (nothing running), and Cancel mid-run: the
    pair stays, and the note says what the Cancel did."""
    from playwright.sync_api import expect

    page = open_page(browser, url, LAPTOP)
    page.get_by_label("Seed").fill("3")
    first = screenshots.run_compare(page, wait_ms=WAIT_MS)
    page.get_by_label("Seed").fill("4")
    screenshots.run_compare(page, wait_ms=WAIT_MS, previous=first)
    expect(page.get_by_text(re.compile(r"^left #3: base model · right #4: \S+ — LoRAs: "))).to_be_visible()
    page.get_by_label("Left (A)").click()
    page.get_by_role("option", name=re.compile(r"^#2 · run 1 ")).click()
    page.get_by_label("Show where they differ").check()
    caption = page.get_by_text(re.compile(r"^left #2: .* · right #4: .* — seed: 3 → 4$"))
    expect(caption).to_be_visible()
    expect(page.get_by_text("Where #2 and #4 differ (brighter: more)")).to_be_visible()
    pair = slider_images(page)
    cancel = page.get_by_role("button", name="Cancel")
    cancel.click()
    expect(page.get_by_text("Cancelled; the result on screen stays as it was.")).to_be_visible()
    assert slider_images(page) == pair

    for name, value in (("Steps", "100"), ("Width", "768"), ("Height", "768")):  # long enough to land mid-run
        field = page.get_by_label(f"number input for {name}")
        field.fill(value)
        field.press("Tab")
    compare = page.get_by_role("button", name="Compare", exact=True)
    compare.click()
    expect(page.locator("#progress")).to_contain_text(re.compile(r"step \d+/100"), timeout=WAIT_MS)
    cancel.click()
    # "Cancelling after the current step; ..." at once, then the job's "Cancelled during the baseline image, after
    # step 3 of 100." (on a busy machine the second can replace the first before the page is read)
    said = r"^Cancel(ling|led) (after the current step|during the \w+ image, after step \d+ of 100\.)"
    cancelled = re.compile(said + r".* the result on screen stays as it was\.$", re.I)
    expect(page.get_by_text(cancelled)).to_be_visible()
    expect(compare).to_be_enabled(timeout=WAIT_MS)
    expect(caption).to_be_visible()
    assert slider_images(page) == pair
    expect(page.locator("#slider")).not_to_contain_text("Error")
    page.close()


def test_on_a_phone_the_result_comes_into_view(browser, url):
    """At 390x844: every tab in reach, the progress in view while the job runs, and the result in view after."""
    from playwright.sync_api import expect

    page = open_page(browser, url, PHONE)
    for tab in ("Compare", "Sweep", "Grid", "Single"):
        expect(page.get_by_role("tab", name=tab, exact=True)).to_be_visible()
    page.get_by_label("Prompt").fill("a tiny robot reading a book")
    page.get_by_label("number input for Steps").fill("40")
    page.get_by_label("number input for Steps").press("Tab")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.locator("#progress")).to_be_in_viewport(timeout=WAIT_MS)
    slider_images(page)
    expect(page.locator("#slider img").first).to_be_in_viewport()
    page.close()
