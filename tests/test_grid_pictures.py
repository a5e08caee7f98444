"""Grid pictures a person reads without help (issue 18): every glyph drawn exists in a shipped font, whatever the
script, axis titles, the base model's column drawn once; a sweep over a stack multiplies each LoRA's own strength,
and says so."""

from __future__ import annotations

import codecs
import logging
import math
import shutil

import numpy as np
import pytest
from helpers import open_client, tiny_model
from PIL import Image, ImageDraw, ImageFont

from fluxdemo.pipeline import GenerateOptions, LoraChoice, sweep
from fluxdemo.pipeline.api import grid, grid_cells, grid_pictures, grid_text, scaled_label
from fluxdemo.pipeline.images import LABEL_BAND, side_by_side
from fluxdemo.pipeline.labels import (
    FONT_FILES,
    _coverage,
    _warn_missing,
    draw_label,
    fit,
    label_fonts,
    runs,
    text_length,
)
from fluxdemo.pipeline.png_settings import read_params
from fluxdemo.studio import build_studio
from fluxdemo.studio.forms import read_request

PROMPT = "a café at dusk — 2×, 夕暮れの猫, кошка"  # accents, a dash, a times sign, Japanese, Cyrillic
ROWS = ["peft.safetensors", "kohya.safetensors:0.8+comfy.safetensors:0.5"]
CELL, GAP = 32, 4
MISSING = ("\uffff", "\ue000", "\U0010fffd")  # a non-character and two private-use codepoints: in no font
STACK = (LoraChoice("comfy.safetensors", 0.5), LoraChoice("peft.safetensors", 0.8))
SWEEP_CAPTIONS = ["base model", "comfy:0.375 + peft:0.6 (× 0.75)", "comfy:0.5 + peft:0.8 (× 1)"]
SWEEP_RAN = [[("comfy.safetensors", 0.0), ("peft.safetensors", 0.0)],
             [("comfy.safetensors", 0.375), ("peft.safetensors", 0.6)],  # 0.8 x 0.75, not 0.6000000000000001
             [("comfy.safetensors", 0.5), ("peft.safetensors", 0.8)]]  # fmt: skip


def bitmap(font: ImageFont.FreeTypeFont, character: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(character)
    return mask.size, bytes(mask)


def notdef(font: ImageFont.FreeTypeFont) -> tuple[tuple[int, int], bytes]:
    """The font's replacement box, as every character it lacks renders."""
    boxes = {bitmap(font, character) for character in MISSING}
    assert len(boxes) == 1
    return boxes.pop()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def made(manager):
    """A grid of two rows (a LoRA, a stack) by three columns (0, 0.5, 1), one seed, 32x32 cells."""
    options = GenerateOptions(PROMPT, steps=2, width=CELL, height=CELL)
    return grid(manager, options, [PROMPT], [1], ROWS, [0, 0.5, 1])


def test_the_detector_sees_the_box_pillows_own_font_drew_for_the_times_sign():
    own = ImageFont.load_default(size=14)
    assert bitmap(own, "×") == notdef(own) and bitmap(own, "x") != notdef(own)
    latin = label_fonts()[0]
    assert bitmap(latin, "猫") == notdef(latin) and bitmap(latin, "a") != notdef(latin)


def boxed(labels: list[str]) -> list[str]:
    """The characters of the labels that the font draw_label picks for them draws as its box."""
    return sorted({c for label in labels for run, font in runs(label) for c in run if bitmap(font, c) == notdef(font)})


def test_every_character_a_grid_draws_has_its_own_glyph_in_a_shipped_font(made):
    assert [font.getname() for font in label_fonts()] == [("Noto Sans", "Regular"), ("Noto Sans", "Regular"),
                                                          ("Noto Sans CJK TC", "Regular")]  # fmt: skip
    text = grid_text(made.report, PROMPT, 1)
    drawn = [text.title, text.row_axis, text.column_axis, *text.rows, *text.columns, "…"]  # "…" ends a cut label
    drawn += [caption for _, caption in grid_cells(made.report)]
    assert text.title == f"seed 1 · {PROMPT}" and text.columns == ("base model", "× 0.5", "× 1")
    assert (text.row_axis, text.column_axis) == ("LoRA or stack", "strength: × each LoRA's own")
    assert boxed(drawn) == []


def test_a_label_is_cut_into_runs_of_the_first_font_that_has_each_character():
    latin, extended, cjk = label_fonts()
    label = "seed 1 · 夕暮れの猫, 고양이 — кошка γάτα ×2"
    assert [(run, font) for run, font in runs(label)] == [
        ("seed 1 · ", latin), ("夕暮れの猫", cjk), (", ", latin), ("고양이", cjk), (" — ", latin), ("кошка", extended),
        (" ", latin), ("γάτα", extended), (" ×2", latin)]  # fmt: skip
    assert boxed([label]) == []


def charset(encoding: str, first: range, second: range) -> set[str]:
    """Every character of a two-byte legacy charset, decoded by Python's own codec."""
    found = set()
    for pair in ((a, b) for a in first for b in second):
        try:
            found.add(codecs.decode(bytes(pair), encoding))
        except UnicodeDecodeError:
            continue
    return {c for c in found if len(c) == 1}


def test_the_cjk_font_has_every_character_of_the_national_charsets_it_was_cut_to():
    """fonts/README.md: GB 2312 (Simplified Chinese), JIS X 0208 (Japanese), KS X 1001 (Korean), Big5 level 1."""
    rows = range(0xA1, 0xFF)
    wanted = set().union(*(charset(e, rows, rows) for e in ("gb2312", "euc_jp", "euc_kr")))
    wanted |= charset("big5", range(0xA4, 0xC7), range(0x40, 0xFF))
    missing = {c for c in wanted if not any(ord(c) in _coverage(path) for path in FONT_FILES)}
    assert len(wanted) > 14_000 and sorted(missing) == ["∼"]  # U+223C: neither Noto Sans nor Noto Sans CJK has it


def test_different_characters_no_latin_font_has_are_drawn_differently():
    """Boxes are all alike: two CJK labels drawn alike would mean both were boxes."""

    def drawn(text: str) -> bytes:
        image = Image.new("L", (80, 24))
        draw_label(ImageDraw.Draw(image), (40, 12), text, 255, "mm")
        return image.tobytes()

    assert len({drawn("猫"), drawn("犬"), drawn("кот"), drawn("кит")}) == 4


def test_a_long_label_is_cut_with_an_ellipsis_to_the_longest_start_that_fits():
    label = "夕暮れの猫 and a café " * 400
    cut = fit(label, 300)
    start = cut.removesuffix("…")
    assert cut.endswith("…") and label.startswith(start) and text_length(cut) <= 300
    assert text_length(label[: len(start) + 1] + "…") > 300
    assert fit("a cat", 300) == "a cat"


def test_a_side_by_side_label_stays_under_its_own_image():
    left, right = Image.new("RGB", (60, 40), (10, 10, 10)), Image.new("RGB", (60, 40), (10, 10, 10))
    both = np.asarray(side_by_side(left, right, ("猫のLoRA:1 + " * 20, "")))
    band = both[40:, :, 0]
    assert band[:, :60].max() == 235 and np.all(band[:, 60:] == 24)  # ink on the left, none spilt to the right


def test_a_character_no_shipped_font_has_is_named_in_the_log_at_most_eight_a_label_and_once(caplog):
    label = "a قط " + "".join(map(chr, range(0x5D0, 0x5EB)))  # Arabic, then Hebrew's 27 letters: in no shipped font
    _warn_missing.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fluxdemo.pipeline.labels"):
        assert [run for run, _ in runs(label)] == [label]  # all in the first font, the letters as its boxes
        for _ in range(2):  # a second drawing logs nothing new
            draw_label(ImageDraw.Draw(Image.new("L", (80, 24))), (0, 12), label, 255)
    assert caplog.messages == [
        f"The label fonts have no glyph for {c!r} (U+{ord(c):04X}); it is drawn as a box. "
        "fluxdemo/pipeline/fonts/README.md says which scripts the shipped fonts cover."
        for c in sorted(set(label) - set("a "))[:8]
    ]


def test_a_grid_picture_has_its_exact_layout_and_the_base_column_once(made):
    ((prompt, seed, picture),) = grid_pictures(made)
    font = ImageFont.truetype(FONT_FILES[0], 14)
    width = lambda text: math.ceil(font.getlength(text))  # noqa: E731
    left = max(width(t) for t in ("peft:1", "kohya:0.8 + comfy:0.5", "LoRA or stack")) + 2 * GAP
    columns = [max(CELL, width(t) + GAP) for t in ("base model", "× 0.5", "× 1")]
    top = 3 * LABEL_BAND  # the title, the columns' axis title, the column labels
    assert (prompt, seed) == (PROMPT, 1)
    assert picture.size == (left + sum(w + GAP for w in columns), top + 2 * (CELL + GAP))
    cells = {(c.row, c.column): made.images[c.label] for c in made.report.cells}
    shown = pixels(picture)
    for (row, column), image in cells.items():
        x = left + sum(w + GAP for w in columns[:column]) + (columns[column] - CELL) // 2
        y = top + row * (CELL + GAP)
        region = shown[y : y + CELL, x : x + CELL]
        if (row, column) == (1, 0):  # the base model again: not drawn under the first row's
            assert np.all(region == 24)
        else:
            assert np.array_equal(region, pixels(image))


def test_grid_captions_name_the_rows_stack_and_the_strength_and_the_base_model_once(made):
    captions = [caption for _, caption in grid_cells(made.report)]
    assert captions == [
        "seed 1 · base model",
        "seed 1 · peft:1 × 0.5",
        "seed 1 · peft:1 × 1",
        "seed 1 · kohya:0.8 + comfy:0.5 × 0.5",
        "seed 1 · kohya:0.8 + comfy:0.5 × 1",
    ]


def test_a_sweep_read_from_the_studio_keeps_the_first_loras_strength():
    values = ("a cat", "comfy.safetensors", "0, 0.75, 1", 3, 2, 3.5, 32, 32,
              "peft.safetensors", 0.8, "", 1.0, "", 1.0, 0.5)  # fmt: skip
    ask = read_request("sweep", values)
    assert ask.stacks == (STACK,) and ask.columns == (0.0, 0.75, 1.0)
    assert [scaled_label(STACK, s) for s in ask.columns] == SWEEP_CAPTIONS


def test_a_library_sweep_over_a_stack_runs_each_loras_own_strength_times_the_column(manager):
    result = sweep(manager, GenerateOptions("a cat", seed=3, steps=2, width=32, height=32), list(STACK), [0, 0.75, 1])
    images = result.report.images
    assert list(images) == ["strength 0", "strength 0.75", "strength 1"]
    assert [[(x.name, x.strength) for x in image.loras] for image in images.values()] == SWEEP_RAN


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_kit):
    """The studio over its own manager, launched, driven as an API caller drives it."""
    loras = tmp_path_factory.mktemp("grid-app") / "loras"
    shutil.copytree(tiny_kit / "loras", loras)
    demo = build_studio(tiny_model(loras))
    demo.launch(prevent_thread_lock=True, quiet=True)
    yield open_client(demo.local_url)
    demo.close()


def test_the_studios_sweep_over_a_stack_captions_and_runs_each_loras_strength_times_the_column(client):
    gallery, _ = client.predict(prompt="a cat", lora="comfy.safetensors", strength=0.5, strengths="0, 0.75, 1", seed=3,
                                steps=2, guidance=3.5, width=32, height=32, lora_2="peft.safetensors",
                                strength_2=0.8, api_name="/sweep")  # fmt: skip
    assert [item["caption"] for item in gallery] == SWEEP_CAPTIONS
    ran = [[(name, strength) for name, _, strength in read_params(item["image"]).loras] for item in gallery]
    assert ran == SWEEP_RAN


def test_the_studios_grid_captions_name_each_rows_stack_and_strength(client):
    pictures, cells, report = client.predict(
        prompt="a cat", prompts="", rows="peft.safetensors\nkohya.safetensors:0.8+comfy.safetensors:0.5",
        strengths="0, 0.5", seeds="1", steps=2, guidance=3.5, width=32, height=32, api_name="/grid",
    )  # fmt: skip
    assert [item["caption"] for item in cells] == [
        "seed 1 · base model", "seed 1 · peft:1 × 0.5", "seed 1 · kohya:0.8 + comfy:0.5 × 0.5"
    ]  # fmt: skip
    assert [item["caption"] for item in pictures] == ["seed 1 · a cat"]
