"""--fast: one static step-skipping schedule for every image of a run, observed in the report, keyed in the cache,
carried by the PNG; never the default."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import numpy as np
import pytest
from helpers import png_with
from PIL import Image

from fluxdemo.cli import main
from fluxdemo.errors import CancelledError, OptionsError
from fluxdemo.pipeline import Controls, GenerateOptions, ResultsCache, compare, generate, params_from_report
from fluxdemo.pipeline.images import a1111_parameters, png_bytes
from fluxdemo.pipeline.options import FastSchedule
from fluxdemo.pipeline.png_settings import read_params, settings_from_png
from fluxdemo.studio import zero_gpu
from fluxdemo.studio.forms import FIELDS, read_request
from fluxdemo.studio.history import differences
from fluxdemo.studio.render import run_summary
from fluxdemo.studio.zero_gpu import ask_seconds

FAST = GenerateOptions("a lighthouse, fast", seed=3, steps=8, width=32, height=32, fast=True)
PREDICTED_8 = [3, 5, 7]  # steps 1-2 run, then every other step (FastSchedule.of(8), counted from 1)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_the_schedule_is_a_function_of_the_step_count_and_scales_with_it() -> None:
    assert GenerateOptions("x").fast is False  # never the default
    assert FastSchedule.of(50) == FastSchedule(50, disable_cache_before_step=10, cache_interval=5)  # research figure
    assert FastSchedule.of(28) == FastSchedule(28, disable_cache_before_step=6, cache_interval=3)
    assert FastSchedule.of(28).predicted() == [7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22, 24, 25, 27, 28]
    assert FastSchedule.of(8).predicted() == PREDICTED_8 and FastSchedule.of(1).predicted() == []
    with pytest.raises(OptionsError) as e:
        replace(FAST, fast="yes").validate()
    assert str(e.value) == "`fast` must be true or false, but is 'yes'."


def test_a_fast_compare_skips_the_same_observed_steps_for_both_images(manager, kit_lora) -> None:
    result = compare(manager, FAST, kit_lora, 0.8)
    images = result.report.images
    assert images["baseline"].skipped_steps == images["lora"].skipped_steps == PREDICTED_8
    assert result.report.fast == FastSchedule.of(8) and images["lora"].options.fast is True
    data = result.report.to_dict()
    assert list(data)[-1] == "fast" and data["fast"]["cache_interval"] == 2
    assert list(data["images"]["lora"]) == ["options", "loras", "reused", "skipped_steps"]
    # one pass for both (PEFT's mixed batch): the cache counts the pass's steps, so both still skip the same ones
    batched = compare(manager, FAST, kit_lora, 0.8, batch=2).report
    assert batched.batches == [["baseline", "lora"]]
    assert batched.images["baseline"].skipped_steps == batched.images["lora"].skipped_steps == PREDICTED_8
    assert not manager.get("transformer").is_cache_enabled  # the hooks live for one pass only
    assert "every image predicted steps 3, 5, 7 instead of running them (3 of 8)" in run_summary(result.report)
    exact = params_from_report(compare(manager, replace(FAST, fast=False), kit_lora, 0.8).report, "lora")
    assert differences(exact, params_from_report(result.report, "lora")) == ["steps: all run → fast (some predicted)"]


def test_strength_zero_in_fast_mode_is_the_fast_baseline_bit_for_bit(manager, kit_lora) -> None:
    result = compare(manager, FAST, kit_lora, 0.0)
    assert np.array_equal(pixels(result.images["lora"]), pixels(result.images["baseline"]))
    alone = generate(manager, FAST).images["baseline"]
    assert np.array_equal(pixels(alone), pixels(result.images["baseline"]))


def test_fast_and_exact_differ_and_the_cache_never_serves_one_for_the_other(manager, kit_lora) -> None:
    cache = ResultsCache()
    exact = compare(manager, replace(FAST, fast=False), kit_lora, 0.8, cache=cache)
    assert exact.report.fast is None and exact.report.images["baseline"].skipped_steps is None
    fast = compare(manager, FAST, kit_lora, 0.5, cache=cache)
    assert "baseline" not in fast.report.reused  # the exact baseline is not the fast one
    assert np.abs(pixels(fast.images["baseline"]) - pixels(exact.images["baseline"])).max() > 0
    again = compare(manager, FAST, kit_lora, 0.8, cache=cache)
    assert "baseline" in again.report.reused and again.report.images["baseline"].skipped_steps == PREDICTED_8
    assert np.array_equal(pixels(again.images["baseline"]), pixels(fast.images["baseline"]))


def test_a_cancelled_fast_run_leaves_no_cache_behind(manager) -> None:
    before = generate(manager, replace(FAST, fast=False)).images["baseline"]
    with pytest.raises(CancelledError):
        generate(manager, FAST, controls=Controls(cancelled=lambda: True))
    assert not manager.get("transformer").is_cache_enabled
    assert np.array_equal(pixels(generate(manager, replace(FAST, fast=False)).images["baseline"]), pixels(before))


def test_the_png_says_fast_and_gives_it_back(manager) -> None:
    report = generate(manager, FAST).report
    params = params_from_report(report, "baseline")
    assert params.fast is True
    text = a1111_parameters(params)
    assert text.endswith('Fast: "TaylorSeer, 3 of 8 steps predicted"')
    image = Image.new("RGB", (16, 16))
    assert settings_from_png(png_bytes(image, params)).params.fast is True
    assert settings_from_png(png_bytes(image, replace(params, fast=False))).params.fast is False
    assert settings_from_png(png_with({"parameters": text})).params.fast is True  # the A1111 text alone


def test_a_visitor_chooses_fast_per_request_last_in_every_job() -> None:
    assert all(fields[-1] == "fast" for fields in FIELDS.values())
    values = ["a cat", "peft.safetensors", 0.8, 1, 8, 3.5, 32, 32, *("", 1.0) * 3]
    assert read_request("compare", [*values, True]).options.fast is True
    assert read_request("generate", [*values, False]).options.fast is False
    assert read_request("compare", [*values, None]).options.fast is False  # an API caller who leaves it out
    assert read_request("compare", values).options.fast is False  # values from before `fast`
    sweep = read_request("sweep", ["a cat", "peft.safetensors", "0, 1", *values[3:], 0.5, True])
    assert sweep.options.fast is True and sweep.columns == (0.0, 1.0) and sweep.stacks[0][0].strength == 0.5
    grid = read_request("grid", ["a cat", "", "peft:0.5", "0, 1", "1", 8, 3.5, 32, 32, None, 1.0, *values[8:], True])
    assert grid.options.fast is True
    with pytest.raises(OptionsError) as e:
        read_request("compare", [*values, "yes" * 10**5])
    assert str(e.value) == "`fast` must be true or false, but is text ('yesyesyesyesyesyesyesyesyesyesyesyesyesy')."


def test_the_cli_takes_fast_and_says_so_in_every_file(tmp_path, monkeypatch, kit_lora) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    levels = {name: logging.getLogger(name).level for name in ("diffusers", "transformers", "peft")}
    size = ["--steps", "8", "--width", "32", "--height", "32"]
    assert main(["compare", "--model", "tiny", "--prompt", "a cat", *size, "--lora", kit_lora, "--fast",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    for name, level in levels.items():  # the CLI quiets the libraries; the rest of the session had them as they were
        logging.getLogger(name).setLevel(level)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fast"]["steps"] == 8 and report["options"]["fast"] is True
    assert [report["images"][label]["skipped_steps"] for label in ("baseline", "lora")] == [PREDICTED_8] * 2
    assert all(read_params(tmp_path / f"{role}.png").fast for role in ("baseline", "lora", "side_by_side"))


def test_a_zero_gpu_visitor_is_charged_for_the_steps_that_run(monkeypatch) -> None:
    monkeypatch.setattr(zero_gpu, "CLOCK", zero_gpu.StepClock())  # the derived prior: no run measured yet
    compare_1024 = GenerateOptions("a cat")  # 28 steps, 1024x1024: 15 s + 2 images x steps x 1.2 s
    assert ask_seconds(None, compare_1024, 2) == math.ceil(15 + 2 * 28 * 1.2)
    assert ask_seconds(None, replace(compare_1024, fast=True), 2) == math.ceil(15 + 2 * 13 * 1.2)
