"""fluxdemo.pipeline.images: parameters in PNGs, safe writes, and the comparison pictures."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from helpers import START_S, png_bomb, png_with
from PIL import Image, PngImagePlugin

from fluxdemo.errors import FluxdemoError, OptionsError
from fluxdemo.pipeline import MAX_SIDE
from fluxdemo.pipeline.images import LABEL_BAND, a1111_parameters, difference, png_bytes, save_png, side_by_side
from fluxdemo.pipeline.png_settings import GUIDANCE_MAX, ImageParams, parse_a1111, read_params, settings_from_png
from fluxdemo.untrusted import MAX_PARAMETERS_CHARS

REPO_ROOT = Path(__file__).resolve().parents[1]

LORA = ImageParams(
    prompt="a red fox in snow, 35mm photo — «très» 雪",
    seed=42,
    steps=28,
    guidance=3.5,
    width=1024,
    height=768,
    model="dev-q8",
    quant="Q8_0",
    lora_name="fox_style",
    lora_sha256="0123456789abcdef" * 4,
    strength=0.8,
    role="lora",
    extra={"offload": "model-offload", "seconds": 12.25, "cached_prompt": True},
)
BASE = ImageParams(prompt="a red fox", seed=7, steps=4, guidance=3.0, width=16, height=16, model="tiny", quant="Q8_0")


def _image(w: int = 16, h: int = 16, color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def test_params_round_trip_exactly_through_png():
    for params in (LORA, BASE):
        assert read_params(png_bytes(_image(), params)) == params
    assert LORA.extra == (("cached_prompt", True), ("offload", "model-offload"), ("seconds", 12.25))
    assert len({LORA, BASE, read_params(png_bytes(_image(), LORA))}) == 2  # hashable, equal after the trip


def test_a1111_text():
    assert a1111_parameters(LORA) == (
        "a red fox in snow, 35mm photo — «très» 雪 <lora:fox_style:0.8>\n"
        "Steps: 28, Sampler: Euler, Schedule type: Flow matching, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 42, "
        'Size: 1024x768, Model: dev-q8, Quant: Q8_0, Lora hashes: "fox_style: 0123456789", Lora strength: 0.8, '
        "cached_prompt: True, offload: model-offload, seconds: 12.25"
    )
    assert a1111_parameters(BASE) == (
        "a red fox\n"
        "Steps: 4, Sampler: Euler, Schedule type: Flow matching, CFG scale: 1, Distilled CFG Scale: 3, Seed: 7, "
        "Size: 16x16, Model: tiny, Quant: Q8_0"
    )


def test_png_carries_both_chunks():
    with Image.open(io.BytesIO(png_bytes(_image(), LORA))) as im:
        assert im.text["parameters"] == a1111_parameters(LORA)
        assert json.loads(im.text["fluxdemo"])["schema"] == 1


def test_read_params_of_a_foreign_png(tmp_path):
    path = tmp_path / "plain.png"
    _image().save(path)
    with pytest.raises(FluxdemoError, match=r"carries no fluxdemo parameters \(no 'fluxdemo' PNG text chunk\)"):
        read_params(path)


def test_params_are_validated():
    with pytest.raises(OptionsError, match="`role` must be one of baseline, lora, side_by_side, grid but is 'both'"):
        ImageParams("p", 1, 1, 1.0, 16, 16, "tiny", "Q8_0", role="both")
    with pytest.raises(OptionsError, match="`extra` values must be str, int, float, bool or None; sizes are not"):
        ImageParams("p", 1, 1, 1.0, 16, 16, "tiny", "Q8_0", extra={"sizes": [1, 2]})


def test_save_refuses_an_existing_path_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "out" / "baseline.png"
    assert save_png(_image(), BASE, out) == out
    assert read_params(out) == BASE
    before = out.read_bytes()
    with pytest.raises(OptionsError) as e:
        save_png(_image(color=(0, 0, 0)), LORA, out)
    assert str(e.value) == f"{out} exists; choose another --out or remove it."
    assert out.read_bytes() == before

    save_png(_image(), LORA, out, overwrite=True)
    assert read_params(out) == LORA
    assert os.listdir(out.parent) == ["baseline.png"]  # no temp file, no hard-link leftover


def test_side_by_side_size_and_placement():
    left, right = _image(40, 30, (255, 0, 0)), _image(20, 50, (0, 0, 255))
    both = side_by_side(left, right)
    assert both.size == (40 + 8 + 20, 50 + LABEL_BAND)
    assert both.getpixel((0, 0)) == (255, 0, 0)
    assert both.getpixel((48, 0)) == (0, 0, 255)
    assert both.crop((0, 50, 68, 50 + LABEL_BAND)).convert("L").getextrema()[1] > 200  # the labels were drawn

    assert side_by_side(left, right, labels=None, gap=0).size == (60, 50)


def test_difference():
    a = _image(8, 8, (10, 20, 30))
    assert difference(a, a.copy()).getbbox() is None  # all zero
    b = a.copy()
    b.putpixel((3, 4), (12, 20, 30))
    d = difference(a, b)
    assert d.getpixel((3, 4)) == (64, 0, 0)  # a change of 2 stretched by the capped gain of 32
    assert d.getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(OptionsError, match=r"one size, got \(8, 8\) and \(4, 4\)"):
        difference(a, _image(4, 4))


# Disk full for real: a 64 kB tmpfs mounted in a private mount namespace of a child process (invisible outside it,
# removed by the kernel when the child exits). The child saves a small PNG, then one that cannot fit.
TINY_DISK_SCRIPT = """
import json, os, sys
from pathlib import Path
from PIL import Image
from fluxdemo.errors import FluxdemoError
from fluxdemo.pipeline.images import save_png
from fluxdemo.pipeline.png_settings import ImageParams
disk = Path(sys.argv[1])
params = ImageParams("p", 1, 1, 1.0, 200, 200, "tiny", "Q8_0")
first = save_png(Image.new("RGB", (8, 8)), params, disk / "first.png").read_bytes()
noise = Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3))  # incompressible: ~120 kB of PNG
try:
    save_png(noise, params, disk / "second.png")
except FluxdemoError as e:
    print(json.dumps({"error": str(e), "files": sorted(os.listdir(disk)),
                      "first_intact": (disk / "first.png").read_bytes() == first}))
"""


def test_disk_full_leaves_no_partial_file(tiny_disk):
    disk, on_tiny_disk = tiny_disk
    out = subprocess.run(
        [*on_tiny_disk, sys.executable, "-c", TINY_DISK_SCRIPT, str(disk)],
        capture_output=True,
        text=True,
        timeout=START_S,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["error"].startswith(f"Disk full while writing {disk / 'second.png'} (")
    assert result["error"].endswith(
        "free there). Nothing was written and earlier outputs are intact: free some space or choose another --out "
        "on a disk with room."
    )
    assert result["files"] == ["first.png"]
    assert result["first_intact"]


# --- settings from a PNG, checked like any input (issue 16) --------------------------------------------------------


def test_a1111_quoted_values_hold_commas_and_colons():
    params = parse_a1111(
        'a fox, in snow <lora:fox:0.7>\nSteps: 30, Lora hashes: "fox: 0123456789, owl: 9876543210", Seed: 9, '
        'Model: "flux, dev", Size: 512x768, Distilled CFG Scale: 2.5'
    )
    assert (params.prompt, params.steps, params.seed, params.model) == ("a fox, in snow", 30, 9, "flux, dev")
    assert (params.width, params.height, params.guidance) == (512, 768, 2.5)
    assert params.loras == (("fox.safetensors", None, 0.7),)


def test_a1111_negative_prompt_lines_stay_out_of_the_prompt():
    params = parse_a1111("a fox\nin snow\nNegative prompt: blurry,\nugly\nSteps: 4, Seed: 3")
    assert (params.prompt, params.steps, params.seed) == ("a fox\nin snow", 4, 3)


def test_a1111_parts_without_a_key_and_an_unclosed_quote_are_skipped():
    params = parse_a1111('p\nSteps: 5, junk, Model: "unclosed, Seed: 8')
    assert (params.steps, params.seed, params.model) == (5, 8, '"unclosed')


def test_long_parameters_text_is_cut_before_it_is_parsed():
    """The 32 kB infotext the old pattern took 28 s over: read up to MAX_PARAMETERS_CHARS, values as they stand."""
    settings = settings_from_png(png_with({"parameters": "a\nSteps: 1, " + "a" * 32_000}))
    assert (settings.params.prompt, settings.params.steps, settings.params.seed) == ("a", 1, 0)
    assert settings.notes == (f"The A1111 parameters are 32,012 characters; only the first {MAX_PARAMETERS_CHARS:,} "
                              "were read.",)  # fmt: skip


def test_settings_are_read_without_decoding_pixels(monkeypatch):
    bomb = png_bomb()
    assert len(bomb) < 512 * 2**10
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("the pixels were decoded"))
    tracemalloc.start()
    try:
        params = read_params(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (params.prompt, params.steps, params.width) == ("a bomb", 20, 512)
    assert peak < 20 * 2**20


def test_fluxdemo_chunk_values_are_clamped_with_notes():
    data = {"schema": 1, "prompt": "p" * 100_000, "seed": -3, "steps": -5, "guidance": float("nan"), "width": 1000,
            "height": 99_999_999, "model": "m", "quant": "q", "role": "lora", "loras": [["x", None, 7.5]]}  # fmt: skip
    settings = settings_from_png(png_with({"fluxdemo": json.dumps(data)}))
    p = settings.params
    assert (len(p.prompt), p.seed, p.steps, p.guidance, p.width, p.height) == (2000, 0, 1, 3.5, 992, MAX_SIDE)
    assert p.loras == (("x", None, 2.0),)
    assert settings.notes == (
        "prompt: 100,000 characters, over the limit of 2,000; cut to its start.",
        "seed: -3 is not a whole number between 0 and 4,294,967,295; set to 0.",
        "steps: -5 is not a whole number between 1 and 100; set to 1.",
        "guidance: not a finite number; set to the default 3.5.",
        "width: 1,000 is not a multiple of 16 between 16 and 2,048; set to 992.",
        "height: 99,999,999 is not a multiple of 16 between 16 and 2,048; set to 2,048.",
        "strength: 7.5 is not between 0 and 2; set to 2.",
    )


def test_a_huge_compressed_fluxdemo_chunk_is_refused_without_inflating_it():
    """52 MB of prompt compress to about 50 kB: refused with a sentence, never inflated whole."""
    png = png_with({"fluxdemo": '{"prompt": "' + "p" * 52_000_000 + '", "steps": -5}'}, zip_itxt=True)
    tracemalloc.start()
    try:
        with pytest.raises(FluxdemoError, match=r"The PNG's 'fluxdemo' text is over 262,144 bytes, far more than"):
            read_params(png)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_damaged_fluxdemo_json_is_a_sentence():
    with pytest.raises(FluxdemoError, match=r"'fluxdemo' text is not the JSON object fluxdemo writes"):
        read_params(png_with({"fluxdemo": "[" * 100_000}))


def test_a_file_that_is_not_a_png_is_a_sentence(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(path, format="JPEG")
    with pytest.raises(FluxdemoError, match=r"^photo.png is not a PNG file; choose a PNG"):
        read_params(path)


def test_guidance_bound_is_the_studios():
    from fluxdemo.studio import page as studio

    assert studio.GUIDANCE_MAX == GUIDANCE_MAX
