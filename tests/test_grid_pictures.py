"""Grid pictures a person reads without help (issue 18): every glyph drawn exists in the shipped font, axis titles,
the base model's column drawn once; a sweep over a stack multiplies each LoRA's own strength, and says so."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image, ImageFont

from fluxdemo.pipeline import GenerateOptions, LoraChoice, sweep
from fluxdemo.pipeline.api import grid, grid_cells, grid_pictures, grid_text, scaled_label
from fluxdemo.pipeline.images import GRID_FONT, LABEL_BAND, label_font
from fluxdemo.pipeline.png_settings import read_params
from fluxdemo.studio import build_studio
from fluxdemo.studio.forms import read_request

PROMPT = "a café at dusk — 2×"  # accents, a dash and a times sign: none of them in Pillow's own font
ROWS = ["peft.safetensors", "kohya.safetensors:0.8+comfy.safetensors:0.5"]
CELL, GAP = 32, 4
MISSING = ("\uffff", "\ue000", "中")  # a non-character, a private-use codepoint, a CJK letter: none in the font
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


def test_every_character_a_grid_draws_has_its_own_glyph_in_the_shipped_font(made):
    font = label_font()
    assert font.path == GRID_FONT and font.getname() == ("Noto Sans", "Regular")
    text = grid_text(made.report, PROMPT, 1)
    drawn = [text.title, text.row_axis, text.column_axis, *text.rows, *text.columns, "…"]  # "…" ends a cut label
    drawn += [caption for _, caption in grid_cells(made.report)]
    assert text.title == f"seed 1 · {PROMPT}" and text.columns == ("base model", "× 0.5", "× 1")
    assert (text.row_axis, text.column_axis) == ("LoRA or stack", "strength: × each LoRA's own")
    box = notdef(font)
    boxed = sorted({c for line in drawn for c in line if bitmap(font, c) == box})
    assert boxed == []


def test_a_grid_picture_has_its_exact_layout_and_the_base_column_once(made):
    ((prompt, seed, picture),) = grid_pictures(made)
    font = ImageFont.truetype(GRID_FONT, 14)
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
    from fluxdemo.model.presets import get_preset
    from fluxdemo.pipeline import Model

    loras = tmp_path_factory.mktemp("grid-app") / "loras"
    shutil.copytree(tiny_kit / "loras", loras)
    demo = build_studio(Model(get_preset("tiny", use_env=False), device="cpu", lora_dir=loras))
    demo.launch(prevent_thread_lock=True, quiet=True)
    yield Client(demo.local_url, verbose=False)
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
