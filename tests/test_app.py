"""The studio end to end: launched on the tiny kit and driven through gradio_client, as an API user drives it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError
from helpers import HANG_S, open_client, tiny_model
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

from fluxdemo.pipeline import GenerateOptions, compare
from fluxdemo.pipeline.png_settings import read_params
from fluxdemo.studio import build_studio, insert_trigger_words, parse_strengths, to_options, without_paths

MAX_UPLOAD = 2**20
OPTS = GenerateOptions("a cat on a red sofa", seed=42, steps=4, width=64, height=48)
STRENGTH = 0.8


def api_args(options: GenerateOptions, lora: str, strength: float = STRENGTH) -> tuple:
    o = options
    return o.prompt, lora, strength, o.seed, o.steps, o.guidance, o.width, o.height


def pixels(source) -> np.ndarray:
    return np.asarray(Image.open(source).convert("RGB"))


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_kit):
    """The studio over its own manager, on a copy of the kit's LoRA folder (uploads land there)."""
    loras = tmp_path_factory.mktemp("app") / "loras"
    shutil.copytree(tiny_kit / "loras", loras)
    manager = tiny_model(loras)
    demo = build_studio(manager, max_upload_bytes=MAX_UPLOAD)
    demo.launch(prevent_thread_lock=True, quiet=True)
    yield demo, loras
    demo.close()


@pytest.fixture(scope="module")
def client(app) -> Client:
    return open_client(app[0].local_url)


@pytest.fixture(scope="module")
def expected(manager, kit_lora):
    """The library's own compare for OPTS, on the test session's separate manager."""
    return compare(manager, OPTS, kit_lora, STRENGTH).images


def test_api_endpoints(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert {"/compare", "/generate", "/sweep", "/inspect_lora", "/upload_lora", "/cancel"} <= names


def test_compare_equals_the_library_pixel_for_pixel(client, expected, kit_lora):
    (baseline, adapted), report = client.predict(*api_args(OPTS, kit_lora), api_name="/compare")
    assert np.array_equal(pixels(baseline), np.asarray(expected["baseline"]))
    assert np.array_equal(pixels(adapted), np.asarray(expected["lora"]))
    assert not np.array_equal(pixels(baseline), pixels(adapted))
    params = read_params(adapted)  # the PNG the slider serves keeps its parameters
    assert (params.role, params.lora_name, params.strength, params.seed) == ("lora", kit_lora, STRENGTH, 42)
    assert read_params(baseline).lora_name is None
    assert report["options"]["seed"] == 42 and report["strategy"] and report["timeline"]


def test_generate_and_sweep(client, kit_lora):
    image, report = client.predict(*api_args(OPTS, None), api_name="/generate")
    assert Image.open(image).size == (64, 48) and report["lora"] is None
    o = OPTS
    gallery, report = client.predict(
        o.prompt, kit_lora, "0, 0.5, 1", o.seed, o.steps, o.guidance, o.width, o.height, api_name="/sweep"
    )
    assert [item["caption"] for item in gallery] == ["base model", "peft:0.5 (× 0.5)", "peft:1 (× 1)"]
    assert [read_params(item["image"]).strength for item in gallery] == [0.0, 0.5, 1.0]


def test_inspect_lora(client, kit_lora):
    report = client.predict(kit_lora, api_name="/inspect_lora")
    assert report["name"] == kit_lora and report["format"] == "peft"
    assert report["rank"] == 4 and report["trigger_words"] == ["tinycat"]


def sdxl_lora(path: Path) -> Path:
    """A well-formed LoRA for SDXL's UNet: readable, but not for FLUX."""
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 2048), f"{key}.lora_up.weight": torch.zeros(640, 4),
               f"{key}.alpha": torch.tensor(4.0)}, path)  # fmt: skip
    return path


def test_upload_then_use_it(client, app, tiny_kit, kit_lora, tmp_path):
    mine = tmp_path / "my style.safetensors"
    shutil.copy(tiny_kit / "loras" / kit_lora, mine)
    name = client.predict(handle_file(mine), api_name="/upload_lora")
    assert name == "my_style.safetensors" and (app[1] / name).is_file()
    assert client.predict(name, api_name="/inspect_lora")["format"] == "peft"


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("notes.safetensors", b"hello, not a LoRA", "not a safetensors file at all"),
        ("big.safetensors", b"\0" * (MAX_UPLOAD + 1), "uploads are limited to"),
    ],
)
def test_bad_upload_is_refused_with_a_reason(client, app, tmp_path, filename, content, message):
    (tmp_path / filename).write_bytes(content)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(tmp_path / filename), api_name="/upload_lora")
    assert not (app[1] / filename).exists()


def test_errors_are_sentences_and_the_next_call_works(client, tmp_path, expected, kit_lora):
    sdxl = client.predict(handle_file(sdxl_lora(tmp_path / "sdxl.safetensors")), api_name="/upload_lora")
    assert not client.predict(sdxl, api_name="/inspect_lora")["compatible"]
    bad = {
        "SDXL": (api_args(OPTS, sdxl), "cannot be applied"),
        "unknown LoRA": (api_args(OPTS, "nope.safetensors"), "No LoRA named 'nope.safetensors'"),
        "outside the folder": (api_args(OPTS, "../loras/peft.safetensors"), "is not a LoRA name"),
        "not a multiple of 16": (api_args(GenerateOptions("a cat", width=1000, height=64), kit_lora), "`width`"),
        "too large": (api_args(GenerateOptions("a cat", width=4096, height=64), kit_lora), "4096"),
        "empty prompt": (api_args(GenerateOptions(" ", steps=2, width=64, height=64), kit_lora), "`prompt`"),
    }
    for case, (args, message) in bad.items():  # the admission refuses what breaks a control's range before queueing
        with pytest.raises((AppError, ValidationError), match=message) as error:
            client.predict(*args, api_name="/compare")
        assert "Traceback" not in str(error.value), case
    (baseline, adapted), _ = client.predict(*api_args(OPTS, kit_lora), api_name="/compare")
    assert np.array_equal(pixels(adapted), np.asarray(expected["lora"]))


def test_cancel_stops_after_a_step_and_the_app_stays_ready(client, expected, kit_lora):
    long = GenerateOptions("a long run", seed=1, steps=100, width=256, height=256)
    job = client.submit(*api_args(long, kit_lora), api_name="/compare")
    deadline = time.monotonic() + HANG_S
    while not any("baseline" in (unit.desc or "") for unit in job.status().progress_data or []):
        assert not job.done() and time.monotonic() < deadline, "the long run never reported a step"
        time.sleep(0.02)
    client.predict(api_name="/cancel")
    with pytest.raises(AppError, match=r"Cancelled during the \w+ image, after step \d+ of 100"):
        job.result(timeout=HANG_S)
    (baseline, adapted), _ = client.predict(*api_args(OPTS, kit_lora), api_name="/compare")
    assert np.array_equal(pixels(baseline), np.asarray(expected["baseline"]))
    assert np.array_equal(pixels(adapted), np.asarray(expected["lora"]))


def test_every_pick_of_what_the_slider_shows_runs_even_while_the_last_is_on_its_way(app):
    """gradio's default trigger_mode "once" drops an event fired while its last run is still going: a second click on
    the history strip, or a second pick of A, on a slow server would never reach the slider."""
    config = app[0].config
    labels = {c["id"]: c["props"].get("label") or "" for c in config["components"]}
    picks = {"Left (A)", "Right (B)", "Show where they differ"}
    modes = {
        (labels[target], event): dependency["trigger_mode"]
        for dependency in config["dependencies"]
        for target, event in dependency["targets"]
        if labels.get(target) in picks or labels.get(target, "").startswith("History")
    }
    assert modes == {
        ("Left (A)", "input"): "always_last",
        ("Right (B)", "input"): "always_last",
        ("Show where they differ", "input"): "always_last",
        (next(label for label in labels.values() if label.startswith("History")), "select"): "always_last",
    }


def test_ui_values_become_options():
    assert to_options("a cat", 7.0, 4.0, 3.5, 64.0, 48.0) == GenerateOptions("a cat", 7, 4, 3.5, 64, 48)
    with pytest.raises(ValueError, match="`seed` is empty"):
        to_options("a cat", None, 4, 3.5, 64, 48)
    with pytest.raises(ValueError, match="`width` must be a whole number"):
        to_options("a cat", 1, 4, 3.5, 64.5, 48)
    assert parse_strengths("0, 0.5;1, 1") == [0.0, 0.5, 1.0]
    for text in ("", "0, x", "3", "nan", ",".join(str(i / 10) for i in range(9))):
        with pytest.raises(ValueError):
            parse_strengths(text)
    assert insert_trigger_words("a cat", {"trigger_words": ["tinycat", "cat"]}) == "tinycat, a cat"
    assert insert_trigger_words("", {"trigger_words": ["tinycat"]}) == "tinycat"


def test_error_sentences_reach_clients_without_the_machines_paths(tmp_path, tiny_kit, kit_lora):
    """A missing model file: the server log has the path, the client only the sentence with the path cut short."""
    from fluxdemo.model.presets import get_preset

    missing = tmp_path / "deep" / "inside" / "flux1-dev-Q8_0.gguf"
    preset = get_preset("tiny", {"transformer": missing}, use_env=False)
    demo = build_studio(tiny_model(tiny_kit / "loras", preset), max_upload_bytes=MAX_UPLOAD)
    demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        with pytest.raises(AppError) as e:
            open_client(demo.local_url).predict(*api_args(OPTS, kit_lora), api_name="/generate")
    finally:
        demo.close()
    assert "flux1-dev-Q8_0.gguf" in str(e.value) and ".../flux1-dev-Q8_0.gguf" in str(e.value)
    assert str(tmp_path) not in str(e.value)


def test_without_paths_keeps_repo_ids_and_numbers():
    message = "tokenizer (black-forest-labs/FLUX.1-dev/tokenizer) is not in the cache (/root/.cache/hf/hub): 3/4 done"
    assert without_paths(message) == (
        "tokenizer (black-forest-labs/FLUX.1-dev/tokenizer) is not in the cache (.../hub): 3/4 done"
    )


def test_a_second_compare_with_a_new_strength_reuses_the_baseline(client, kit_lora):
    """The studio keeps a results cache: only the LoRA image is denoised again, and the baseline is the same PNG
    content pixel for pixel."""
    options = GenerateOptions("a reused baseline", seed=7, steps=3, width=48, height=32)
    (first_base, _), _ = client.predict(*api_args(options, kit_lora, 1.0), api_name="/compare")
    (second_base, second_lora), report = client.predict(*api_args(options, kit_lora, 0.5), api_name="/compare")
    assert report["reused"] == ["encode", "baseline"]
    names = [s["name"] for s in report["timeline"]]
    assert "baseline (cached)" in names and not any(n.startswith("baseline step") for n in names)
    assert sum(n.startswith("lora step") for n in names) == 3
    assert np.array_equal(pixels(first_base), pixels(second_base))
    assert read_params(second_lora).loras == ((kit_lora, report["loras"][0]["sha256"], 0.5),)


def test_settings_come_back_from_a_png(manager, tmp_path, kit_lora):
    """A PNG the studio made, and one with only A1111 parameters, set every control they name."""
    from fluxdemo.pipeline.images import params_from_report, save_png
    from fluxdemo.studio import Studio

    studio = Studio(manager)
    result = compare(manager, GenerateOptions("a cat", seed=11, steps=2, width=32, height=48), kit_lora, 0.7)
    png = save_png(result.images["lora"], params_from_report(result.report, "lora"), tmp_path / "lora.png")
    *values, note = studio.settings_from_png(str(png))
    assert values == ["a cat", 11, 2, 3.5, 32, 48, kit_lora, 0.7, *("", 1.0) * 3, False]
    said = "**Set from the PNG:** seed 11, 2 steps, guidance 3.5, 32×48, LoRAs peft:0\\.7, exact, and its prompt."
    assert note == said
    info = PngInfo()
    info.add_text("parameters", "a fox <lora:peft:0.8> <lora:kohya:0.4>\nNegative prompt: blur\nSteps: 20, Sampler: "
                                "Euler, Distilled CFG Scale: 3, Seed: 5, Size: 512x768, Model: flux1-dev")  # fmt: skip
    Image.new("RGB", (8, 8)).save(tmp_path / "forge.png", pnginfo=info)
    *values, note = studio.settings_from_png(str(tmp_path / "forge.png"))
    assert values == ["a fox", 5, 20, 3.0, 512, 768, "peft.safetensors", 0.8, "kohya.safetensors", 0.4,
                      *("", 1.0) * 2, False]  # fmt: skip
    assert note.startswith(
        "**Set from the PNG:** seed 5, 20 steps, guidance 3, 512×768, LoRAs peft:0\\.8 \\+ kohya:0\\.4"
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(gr.Error, match=r"plain.png carries no fluxdemo parameters .* and no A1111 `parameters`"):
        studio.settings_from_png(str(tmp_path / "plain.png"))


def test_a_huge_trigger_phrase_reaches_a_visitor_as_a_small_report(client, app, tmp_path):
    """A 150,000-word trigger phrase (1.8 MB of metadata) in the folder: a visitor's /inspect_lora answer stays under
    100 kB."""
    phrase = ", ".join(f"word{i}" for i in range(150_000))
    save_file(load_file(app[1] / "peft.safetensors"), app[1] / "wordy.safetensors",
              metadata={"modelspec.trigger_phrase": phrase})  # fmt: skip
    report = client.predict("wordy.safetensors", api_name="/inspect_lora")
    assert len(json.dumps(report)) < 100_000
    assert report["trigger_words"][:2] == ["word0", "word1"]
