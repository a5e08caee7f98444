"""Live previews: the latent projection, TAEF1 (a tiny VAE decoder, here with random weights in a small config) when
it is on disk, and the time budget that keeps previews under 5% of the steps' time."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from diffusers.image_processor import VaeImageProcessor

from fluxdemo.errors import OptionsError
from fluxdemo.pipeline import Controls, GenerateOptions, generate
from fluxdemo.pipeline.previews import TAEF1_REPO, TinyDecoder, latent_preview, preview_drawer, unpack
from fluxdemo.pipeline.stages import initial_noise

SMALL = dict(latent_channels=16, encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
             num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))  # fmt: skip


def save_tiny_vae(folder, **config) -> AutoencoderTiny:
    torch.manual_seed(0)
    vae = AutoencoderTiny(**{**SMALL, **config})
    vae.save_pretrained(folder, safe_serialization=True)
    return vae


def test_the_tiny_decoder_draws_what_diffusers_decodes_at_full_size(tmp_path):
    """TinyDecoder's picture equals diffusers' own AutoencoderTiny decode and postprocessing within 1/255."""
    vae = save_tiny_vae(tmp_path / "taef1")
    draw = preview_drawer(str(tmp_path / "taef1"))
    assert isinstance(draw, TinyDecoder)
    packed = initial_noise(3, 64, 48) * 0.5
    picture = draw(packed, 64, 48)
    assert picture.size == (64, 48)
    with torch.inference_mode():
        reference = VaeImageProcessor(vae_scale_factor=8).postprocess(vae.decode(unpack(packed, 64, 48)).sample,
                                                                      output_type="pil")[0]  # fmt: skip
    worst = np.abs(np.asarray(picture, np.int16) - np.asarray(reference, np.int16)).max()
    assert worst <= 1, worst
    assert np.asarray(picture).std() > 1  # a picture, not a flat colour
    assert latent_preview(packed, 64, 48).size == (8, 6)


def test_taef1_comes_from_the_hugging_face_cache_only_when_it_is_there(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert preview_drawer() is latent_preview  # nothing cached: the projection, and no download attempted
    repo = tmp_path / f"models--{TAEF1_REPO.replace('/', '--')}"
    save_tiny_vae(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    draw = preview_drawer()
    assert isinstance(draw, TinyDecoder) and draw.source == str(repo / "snapshots" / "abc123")
    assert preview_drawer("off") is latent_preview


def test_a_bad_preview_decoder_is_a_sentence(tmp_path):
    with pytest.raises(
        OptionsError,
        match=r"^The preview decoder .*nowhere is not a folder with config.json and "
        r"safetensors weights: download TAEF1 with `hf download madebyollin/taef1",
    ):
        preview_drawer(str(tmp_path / "nowhere"))
    save_tiny_vae(tmp_path / "sd", latent_channels=4)
    with pytest.raises(OptionsError, match=r"takes 4 latent channels, FLUX.1 has 16: use TAEF1"):
        preview_drawer(str(tmp_path / "sd"))
    vae = AutoencoderTiny(**SMALL)
    vae.save_pretrained(tmp_path / "pickle", safe_serialization=False)  # a .bin: never unpickled
    with pytest.raises(OptionsError, match=r"could not be loaded .*needs config.json and "
                                           r"diffusion_pytorch_model.safetensors"):  # fmt: skip
        preview_drawer(str(tmp_path / "pickle"))


def test_previews_stay_within_their_time_budget(manager):
    """A drawer slower than the steps is called once, then skipped while previews have cost more than 5% of the
    steps' time; the picture is unchanged by it."""
    options = GenerateOptions("budget", seed=2, steps=6, width=32, height=32)
    seen = []

    def slow(packed, width, height):
        time.sleep(0.2)  # far more than a tiny 32x32 step
        return latent_preview(packed, width, height)

    with_previews = generate(manager, options, controls=Controls(preview=lambda *a: seen.append(a[1]),
                                                                 preview_every=1, draw=slow))  # fmt: skip
    assert seen == [1]
    plain = generate(manager, options)
    assert np.array_equal(np.asarray(with_previews.images["baseline"]), np.asarray(plain.images["baseline"]))


def test_a_drawer_that_knows_it_is_too_slow_is_not_called(manager, tmp_path):
    """TinyDecoder measures itself on every draw: beside a tiny model's millisecond steps, a preview that would cost
    more than the budget is never drawn, not even once; with a 0-cost estimate it is drawn at once."""
    save_tiny_vae(tmp_path / "taef1")
    draw = preview_drawer(str(tmp_path / "taef1"))
    assert draw.seconds_per_megapixel > 0  # measured when it was made
    draw.seconds_per_megapixel = 1e3  # 1 s for a 32x32 preview
    options = GenerateOptions("budget", seed=2, steps=4, width=32, height=32)
    seen = []
    generate(manager, options, controls=Controls(preview=lambda *a: seen.append(a[1]), preview_every=1, draw=draw))
    assert seen == []
    draw.seconds_per_megapixel = 0.0
    generate(manager, options, controls=Controls(preview=lambda *a: seen.append(a[2].size), preview_every=4,
                                                 draw=draw))  # fmt: skip
    assert seen == [(32, 32)]
    assert 0 < draw.seconds_per_megapixel < 1e3  # the draw measured itself again
