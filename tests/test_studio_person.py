"""The studio's handlers as a person meets them, without a browser: a request that would fail is refused by the check
before its job and the note says why; an SDXL upload is listed, not picked; every LoRA of a stack has its card."""

from __future__ import annotations

import shutil

import gradio as gr
import lora_factory as lf
import pytest
from helpers import card_report, tiny_model

from fluxdemo.studio import Studio
from fluxdemo.studio.lora_files import NONE, NONE_LABEL, LoraFiles
from fluxdemo.studio.render import lora_card

ARGS = ("a cat", "peft.safetensors", 1.0, 0, 2, 3.5, 32, 32, *("", 1.0) * 3)  # compare's fields, in API order


@pytest.fixture
def studio(tiny_kit, tmp_path) -> Studio:
    """A Studio over a copy of the kit's LoRAs and an SDXL LoRA (readable, but not for FLUX)."""
    shutil.copytree(tiny_kit / "loras", tmp_path / "loras")
    lf.sdxl_kohya(tmp_path / "loras" / "sdxl.safetensors")
    studio = Studio(tiny_model(tmp_path / "loras"))
    studio.library.refresh()  # as build_studio does: the folder listed once before the page is up
    return studio


def files_of(studio: Studio) -> LoraFiles:
    return LoraFiles(studio.library, 2**20, studio.cancel_flags)


def test_an_sdxl_lora_is_refused_by_the_check_and_the_note_says_why(studio):
    visitor = gr.Request(session_hash="visitor")
    check = studio.checker("compare")
    check(visitor, *ARGS)  # a LoRA that fits passes
    with pytest.raises(gr.Error) as refused:
        check(visitor, "a cat", "sdxl.safetensors", *ARGS[2:])
    sentence = "sdxl.safetensors cannot be applied to this model: an SDXL LoRA (kohya naming: "
    assert refused.value.message.startswith(sentence)
    note = studio.refusal(visitor)
    assert note.startswith(r"**Not run:** sdxl\.safetensors cannot be applied to this model: ")
    assert note.endswith(" The result on screen stays as it was.")
    assert studio.refusal(gr.Request(session_hash="other")) == (
        r"**Not run:** It was refused or cancelled before it started\. The result on screen stays as it was."
    )


def test_cancel_with_nothing_running_says_so(studio):
    assert studio.cancel(gr.Request(session_hash="idle")) == "**Cancelled;** the result on screen stays as it was."


def test_an_sdxl_upload_is_listed_not_picked_and_the_count_follows(studio, tmp_path):
    files = files_of(studio)
    first = files.pick("sdxl.safetensors", "peft.safetensors", "", "", "")[0]
    assert first.value == "peft.safetensors"  # the first picker as it was
    assert ("sdxl.safetensors", "sdxl.safetensors") in first.choices and first.info == "5 in loras/"
    shutil.copy(tmp_path / "loras" / "peft.safetensors", tmp_path / "loras" / "mine.safetensors")
    first = files.pick("mine.safetensors", "peft.safetensors", "", "", "")[0]
    assert (first.value, first.info) == ("mine.safetensors", "6 in loras/")
    assert first.choices[0] == (NONE_LABEL, NONE)  # no LoRA: Generate makes a base image


def test_every_lora_of_a_stack_has_its_card(studio):
    files = files_of(studio)
    card = files.stack_card("peft.safetensors", "sdxl.safetensors", "", "missing.safetensors")
    peft, sdxl, missing = card.split("\n\n---\n\n")
    assert peft.startswith(r"### peft\.safetensors") and "fits the loaded model" in peft
    assert sdxl.startswith(r"### sdxl\.safetensors") and "**does not fit** the loaded model" in sdxl
    size = (studio.library.folder / "sdxl.safetensors").stat().st_size
    assert f"rank 4 · alpha 4\\.0 · {size / 1e3:.0f} kB" in sdxl
    assert missing.startswith(r"### missing\.safetensors" + "\n\n- **Problem:** No LoRA named")
    assert files.stack_card("", "") == lora_card(None)


def test_a_lora_without_alpha_reads_as_scale_1():
    report = card_report(format="peft", alpha=None, size=2_500_000)
    assert "rank 4 · no alpha stored (scale 1) · 2.5 MB" in lora_card(report)


def test_a_png_naming_a_lora_the_app_lacks_sets_the_rest_and_warns(studio, tmp_path):
    """The missing LoRA stays out of the pickers (no picker holds an unknown name), and the note says so."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters", "a fox <lora:gone:0.5> <lora:peft:0.8>\nSteps: 20, Seed: 5, Size: 512x768, CFG scale: 1"
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "forge.png", pnginfo=info)
    *values, note = studio.settings_from_png(str(tmp_path / "forge.png"))
    assert values[6:] == ["peft.safetensors", 0.8, *("", 1.0) * 3, False]  # the last: fast, not set by the PNG
    assert note.endswith(
        r"**Warning:** not in the LoRA folder: gone\.safetensors. They are left out of the stack: upload them (or "
        "fetch them from the Hub), then pick them to reproduce the picture."
    )
