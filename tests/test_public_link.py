"""A public link's rules that need no server: every request read and counted before it is queued, the work unit,
each visitor's caches apart, bounded grid pictures, and file-derived text escaped on the LoRA card."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import card_report
from PIL import Image

from fluxdemo.errors import OptionsError
from fluxdemo.pipeline import Controls, GenerateOptions, ResultsCache, RunReport, compare
from fluxdemo.pipeline import api as pipeline
from fluxdemo.pipeline.limits import DEFAULT_LIMITS, MEGAPIXEL, STEP_FIXED_PIXELS, check_work, work
from fluxdemo.studio import lora_card, read_request

OPTS = GenerateOptions("a lighthouse at dusk", seed=5, steps=3, width=32, height=32)
PICKERS = ("", 1.0, "", 1.0, "", 1.0)  # the stack rows below the first, empty


def grid_values(rows: str, strengths: str = "0, 1", seeds: str = "1") -> tuple:
    return ("a cat", "", rows, strengths, seeds, 4, 3.5, 64, 64, "peft.safetensors", 1.0, *PICKERS)


# --- the request, read once and checked whole -------------------------------------------------------------------


def test_a_grid_of_64_rows_of_hub_names_is_refused_by_its_count_before_anything_is_fetched() -> None:
    rows = "\n".join("+".join(f"owner/repo-{r}-{i}" for i in range(4)) for r in range(64))
    with pytest.raises(OptionsError) as error:
        read_request("grid", grid_values(rows, strengths="1"))
    assert str(error.value) == (
        "One run can use at most 8 different LoRAs, but this one names 256: split it into smaller runs."
    )


def test_a_stack_of_five_is_refused_before_anything_is_fetched() -> None:
    with pytest.raises(OptionsError, match=r"^A stack holds at most 4 LoRAs, but one here has 5\.$"):
        read_request("grid", grid_values("a+b+c+d+e"))


def test_a_grid_over_64_cells_is_refused_by_its_count() -> None:
    with pytest.raises(OptionsError, match=r"is 72 images; at most 64 fit in one grid\.$"):
        read_request("grid", grid_values("\n".join(f"lora{r}" for r in range(8)), "0, 0.5, 1", "1, 2, 3"))


def test_a_compare_is_read_into_one_stack_and_two_images() -> None:
    ask = read_request("compare", ("a cat", "a:0.5+b", 1.0, 3, 4, 3.5, 64, 64, "c", 0.25, "", 1.0, "", 1.0))
    assert [(c.name, c.strength) for c in ask.stacks[0]] == [("a", 0.5), ("b", 1.0), ("c", 0.25)]
    assert ask.images == 2 and ask.lora_names == ["a", "b", "c"] and ask.options.seed == 3


def test_a_sweep_checks_its_columns_against_the_one_strength_range() -> None:
    with pytest.raises(OptionsError, match=r"^Strengths must be between 0 and 2, but 3 is not\.$"):
        read_request("sweep", ("a cat", "a", "0, 3", 3, 4, 3.5, 64, 64, *PICKERS, 1.0))


# --- the work unit: the prompt's tokens and the decode count ----------------------------------------------------


def test_a_step_costs_its_image_tokens_and_a_fixed_part_measured_on_the_real_width_kit() -> None:
    assert work(1, 1, 1024, 1024) == (MEGAPIXEL + STEP_FIXED_PIXELS + MEGAPIXEL) / MEGAPIXEL
    assert work(64, 10, 16, 16) == 64 * (10 * (256 + STEP_FIXED_PIXELS) + 256) / MEGAPIXEL
    assert work(64, 10, 16, 16) > 100  # the 16x16 grid that held the slot for 456 s was 0.156 units before


@pytest.mark.parametrize(
    "images, steps, side",
    [(2, 28, 1024), (6, 28, 1024), (12, 28, 1024)],  # a compare, the default sweep, the default grid
)
def test_the_default_budget_admits_every_ordinary_request(images: int, steps: int, side: int) -> None:
    assert check_work(images, steps, side, side) <= DEFAULT_LIMITS.max_work


def test_a_refusal_names_the_shape_the_units_and_the_flag() -> None:
    with pytest.raises(OptionsError) as error:
        check_work(8, 100, 2048, 2048)
    assert str(error.value) == (
        "This request is 8 images x 100 steps at 2048x2048 (with the prompt's tokens and the decode) = 3,415 units "
        "of work; the limit is 512 (the operator can raise it with --max-work or FLUXDEMO_MAX_WORK). Ask for fewer "
        "images, fewer steps or a smaller size."
    )


# --- each visitor's caches --------------------------------------------------------------------------------------


def stage_names(report: RunReport) -> list[str]:
    return [stage.name for stage in report.timeline]


def test_another_visitors_prompt_is_not_reused_and_the_report_reads_the_same(manager, kit_lora) -> None:
    cache = ResultsCache()
    compare(manager, OPTS, kit_lora, 0.5)  # the model and the LoRA loaded: what is left to differ is the caches
    mine = compare(manager, OPTS, kit_lora, 1.0, controls=Controls(cache_scope="visitor-a"), cache=cache)
    theirs = compare(manager, OPTS, kit_lora, 1.0, controls=Controls(cache_scope="visitor-b"), cache=cache)
    assert mine.report.reused == theirs.report.reused == []
    assert stage_names(mine.report) == stage_names(theirs.report)
    assert all(np.array_equal(np.asarray(mine.images[k]), np.asarray(theirs.images[k])) for k in mine.images)
    again = compare(manager, OPTS, kit_lora, 1.0, controls=Controls(cache_scope="visitor-a"), cache=cache)
    assert again.report.reused == ["baseline", "lora"]  # a visitor's own work is still reused


# --- bounded pictures, escaped text -----------------------------------------------------------------------------


def test_a_grid_picture_is_scaled_down_to_its_pixel_bound(monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "MAX_GRID_PICTURE_PIXELS", 64 * 64)
    rows = [[Image.new("RGB", (32, 32), (r * 40, c * 40, 0)) for c in range(4)] for r in range(4)]
    fitted = pipeline._fit_cells(rows)
    assert {cell.size for row in fitted for cell in row} == {(16, 16)}
    assert sum(cell.width * cell.height for row in fitted for cell in row) <= 64 * 64


def test_file_derived_text_on_the_lora_card_is_text_not_markup() -> None:
    card = lora_card(card_report(name="<img src=x onerror=alert(1)>", base_model_hint="[click](http://evil)",
                                 trigger_words=["<a href='http://evil'>zkz</a>", "# heading"]))  # fmt: skip
    assert "<img" not in card and "<a " not in card and "](http" not in card
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in card and "\\# heading" in card


def test_the_lora_card_lists_a_bounded_number_of_trigger_words() -> None:
    card = lora_card(card_report(trigger_words=[f"word{i}" for i in range(5000)]))
    assert card.endswith("Trigger words: " + ", ".join(f"word{i}" for i in range(12)))
