"""LoRAs of FLUX.1 look-alikes and other families are named in the verdict, from files in their real key layouts
(BFL flux2/model.py and diffusers' Flux2Transformer2DModel for FLUX.2, Chroma's distilled_guidance_layer, diffusers'
SD3Transformer2DModel, kohya/diffusers SDXL and SD1.5), and `inspect-lora --json` exits 2 for each."""

from __future__ import annotations

import json
import re

import lora_factory as lf
import pytest
import torch

from fluxdemo import cli

R = 2


def pair(prefix: str, out: int, inp: int, naming: str = "peft") -> dict[str, torch.Tensor]:
    down, up = ("lora_A", "lora_B") if naming == "peft" else ("lora_down", "lora_up")
    return {f"{prefix}.{down}.weight": torch.zeros(R, inp), f"{prefix}.{up}.weight": torch.zeros(out, R)}


def flux2_klein_bfl(path, width=3072, meta=None):
    """ai-toolkit's FLUX.2 klein LoRA in ComfyUI/BFL naming: attention and the SwiGLU MLP (6x, 9x width rows)."""
    t = pair("diffusion_model.double_blocks.0.img_attn.qkv", 3 * width, width)
    t |= pair("diffusion_model.double_blocks.0.img_mlp.0", 6 * width, width)
    t |= pair("diffusion_model.double_blocks.0.img_mlp.2", width, 3 * width)
    t |= pair("diffusion_model.single_blocks.0.linear1", 9 * width, width)
    t |= pair("diffusion_model.single_blocks.0.linear2", width, 4 * width)
    return lf.save(path, t, meta)


def flux2_dev_diffusers(path):
    w = 6144
    t = pair("transformer.transformer_blocks.0.attn.to_q", w, w)
    t |= pair("transformer.transformer_blocks.0.ff.linear_in", 6 * w, w)
    t |= pair("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", 9 * w, w)
    return lf.save(path, t)


def flux1_layout(path, meta):
    """A FLUX.1-dev-shaped kohya LoRA: what Kontext, Fill and Chroma LoRAs look like without their metadata."""
    t = pair("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072, "kohya")
    t |= pair("lora_unet_single_blocks_0_linear2", 3072, 15360, "kohya")
    return lf.save(path, t, meta)


def chroma_keys(path):
    t = pair("diffusion_model.double_blocks.0.img_attn.qkv", 9216, 3072)
    t |= pair("diffusion_model.distilled_guidance_layer.layers.0.in_layer", 5120, 5120)
    return lf.save(path, t)


def sd3_diffusers(path, width, attn2=False):
    t = pair("transformer.transformer_blocks.0.attn.to_q", width, width)
    t |= pair("transformer.transformer_blocks.0.attn.add_k_proj", width, width)
    if attn2:  # SD3.5 Medium's second attention in its first blocks
        t |= pair("transformer.transformer_blocks.0.attn2.to_q", width, width)
    return lf.save(path, t)


def sd3_kohya(path):
    return lf.save(path, pair("lora_unet_joint_blocks_0_x_block_attn_qkv", 4608, 1536, "kohya"))


CASES = [
    (
        flux2_klein_bfl,
        r"^a FLUX\.2 klein 4B LoRA: it does not fit FLUX\.1-dev \(its .* has \d+ rows for width 3072, FLUX\.2's Sw",
    ),
    (lambda p: flux2_klein_bfl(p, 4096), r"^a FLUX\.2 klein 9B LoRA: it does not fit FLUX\.1-dev"),
    (
        lambda p: flux2_klein_bfl(p, meta={"modelspec.architecture": "flux-2-klein-4b/lora"}),
        r"^a FLUX\.2 klein LoRA: it does not fit FLUX\.1-dev \(its metadata names 'flux-2-klein-4b/lora",
    ),
    (flux2_dev_diffusers, r"^a FLUX\.2 dev LoRA: it does not fit FLUX\.1-dev \(its key .* is FLUX\.2's\)"),
    (
        lambda p: flux1_layout(p, {"modelspec.architecture": "flux-1-kontext-dev/lora"}),
        r"^a FLUX\.1 Kontext LoRA: it does not fit FLUX\.1-dev \(its metadata names 'flux-1-kontext-dev/lora'",
    ),
    (lambda p: flux1_layout(p, {"ss_base_model_version": "flux1_fill"}), r"^a FLUX\.1 Fill LoRA: it does not fit"),
    (lambda p: flux1_layout(p, {"modelspec.architecture": "flux-1-canny-dev/lora"}), r"^a FLUX\.1 Canny LoRA"),
    (lambda p: flux1_layout(p, {"modelspec.architecture": "flux-1-depth-dev/lora"}), r"^a FLUX\.1 Depth LoRA"),
    (lambda p: flux1_layout(p, {"modelspec.architecture": "chroma/lora"}), r"^a Chroma LoRA: it does not fit"),
    (chroma_keys, r"^a Chroma LoRA: it does not fit FLUX\.1-dev \(its key .*distilled_guidance_layer"),
    (lambda p: sd3_diffusers(p, 1536, attn2=True), r"^an SD3 Medium / SD3\.5 Medium LoRA: it does not fit"),
    (
        lambda p: sd3_diffusers(p, 2432),
        r"^an SD3\.5 Large LoRA: it does not fit FLUX\.1-dev \(its .* reads width 2432",
    ),
    (sd3_kohya, r"^an SD3 Medium / SD3\.5 Medium LoRA: it does not fit .*x_block"),
    (lf.sdxl_kohya, r"^an SDXL LoRA \(kohya naming"),
    (lf.sdxl_diffusers, r"^an SDXL LoRA \(diffusers naming"),
    (lf.sd15_kohya, r"^an SD1\.5 LoRA \(kohya naming"),
]
IDS = ["klein4b", "klein9b", "klein-meta", "flux2-dev", "kontext", "fill", "canny", "depth", "chroma-meta",
       "chroma-keys", "sd35-medium", "sd35-large", "sd3-kohya", "sdxl-kohya", "sdxl-diffusers", "sd15"]  # fmt: skip


@pytest.mark.parametrize("build, verdict", CASES, ids=IDS)
def test_each_family_is_named_and_inspect_exits_2(tmp_path, capsys, build, verdict):
    path = build(tmp_path / "x.safetensors")
    assert cli.main(["inspect-lora", str(path), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["compatible"] is False
    assert re.search(verdict, report["problems"][0]), report["problems"]


def test_a_flux1_lora_with_matching_metadata_still_fits(tmp_path, capsys):
    path = flux1_layout(tmp_path / "ok.safetensors", {"modelspec.architecture": "flux-1-dev/lora"})
    assert cli.main(["inspect-lora", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
