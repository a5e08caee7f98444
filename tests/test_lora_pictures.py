"""Pictures with a LoRA equal the hand merge (W + strength * delta, bias + strength * diff_b) within 1/255, through
the whole stack: library, converter, adapters on the packed GGUF transformer, pipeline."""

from __future__ import annotations

import lora_factory as lf
import numpy as np
import pytest
import torch
from test_lora_formats import TINY, comfy_save

from fluxdemo.config import get_preset
from fluxdemo.manager import ModelManager
from fluxdemo.pipeline import GenerateOptions, generate

OPTS = GenerateOptions("a lighthouse at dusk", seed=5, steps=3, width=32, height=32)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def module_deltas(want: dict, dims) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BFL module (delta, bias delta) -> per diffusers module, rows split and halves swapped like the model's."""
    out = {}
    for bfl, (delta, bias) in want.items():
        biases = lf.split_delta(bfl, bias[:, None], dims)
        out |= {m: (d, biases[m][:, 0]) for m, d in lf.split_delta(bfl, delta, dims).items()}
    return out


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "loras"


def assert_picture_is_the_hand_merge(kit, folder, name: str, deltas: dict, strength: float) -> float:
    manager = ModelManager(get_preset("tiny", use_env=False), device="cpu", lora_dir=folder)
    adapted = pixels(generate(manager, OPTS, name, strength).images["lora"])
    reference = ModelManager(get_preset("tiny", use_env=False), device="cpu", lora_dir=kit / "loras")
    generate(reference, OPTS)  # loads the transformer
    with lf.HandMerge(reference.get("transformer"), deltas, strength):
        merged = pixels(generate(reference, OPTS).images["baseline"])
    baseline = pixels(generate(reference, OPTS).images["baseline"])
    assert np.abs(merged - baseline).mean() > 1.0  # the LoRA changes the picture, so the check below means something
    worst = int(np.abs(adapted - merged).max())
    assert worst <= 1, worst
    return worst


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn], ids=["f16", "fp8"])
def test_comfy_bias_and_full_deltas(tiny_kit, folder, strength, dtype):
    # size 8: strong enough to move a 32x32 picture of the tiny model visibly
    tensors, want = comfy_save(TINY, torch.Generator().manual_seed(21), dtype, size=8)
    folder.mkdir()
    lf.save(folder / "comfy.safetensors", tensors)
    assert_picture_is_the_hand_merge(tiny_kit, folder, "comfy.safetensors", module_deltas(want, TINY), strength)


def lycoris_file(g: torch.Generator) -> tuple[dict, dict]:
    """SimpleTuner's documented FLUX LoKr (full w1 and w2, factor 16, diffusers names under `lycoris_`), kohya-named
    LoKr with a decomposed w2, and a kohya-named LoHa; -> (tensors, per diffusers module (delta, None))."""
    d, t, want = TINY.inner, {}, {}
    for module, (out, inp) in {
        "transformer_blocks.0.attn.to_q": (d, d),
        "single_transformer_blocks.1.proj_out": (d, d + TINY.mlp),
    }.items():
        kind = lf.lokr((out, inp), (16, 16), None, None, g)
        kind["lokr_w1"] = kind["lokr_w1"] * 0.1
        t |= {f"lycoris_{module.replace('.', '_')}.{r}": v for r, v in kind.items()}
        want[f"transformer.{module}"] = (lf.lokr_delta(kind, None), None)
    kind = lf.lokr((3 * d, d), (4, 4), 2, None, g)
    t |= {f"lora_unet_double_blocks_1_img_attn_qkv.{r}": v for r, v in kind.items()}
    t["lora_unet_double_blocks_1_img_attn_qkv.alpha"] = torch.tensor(0.5)
    want |= {
        m: (x, None) for m, x in lf.split_delta("double_blocks.1.img_attn.qkv", lf.lokr_delta(kind, 0.5), TINY).items()
    }
    kind = lf.loha((2 * d, d), 3, g)
    t |= {f"lora_unet_final_layer_adaLN_modulation_1.{r}": v for r, v in kind.items()}
    t["lora_unet_final_layer_adaLN_modulation_1.alpha"] = torch.tensor(1.5)
    delta = lf.loha_delta(kind, 1.5).float()
    want |= {m: (x, None) for m, x in lf.split_delta("final_layer.adaLN_modulation.1", delta, TINY).items()}
    return t, want


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_lokr_and_loha_factored(tiny_kit, folder, strength):
    tensors, want = lycoris_file(torch.Generator().manual_seed(31))
    folder.mkdir()
    lf.save(folder / "lycoris.safetensors", tensors)
    assert_picture_is_the_hand_merge(tiny_kit, folder, "lycoris.safetensors", want, strength)


def test_a_clip_only_lokr_changes_the_picture_and_is_off_at_zero(tiny_kit, folder):
    """A LoKr on CLIP-L alone: no transformer keys, so a zero anchor pair registers the adapter; the text encoder
    is adapted (the prompt encoded again) and strength 0 gives the base picture bit for bit."""
    kind = lf.lokr((32, 32), (4, 4), None, None, torch.Generator().manual_seed(0))
    folder.mkdir()
    prefix = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    lf.save(folder / "clip.safetensors", {f"{prefix}.{r}": v * 3 for r, v in kind.items()})
    manager = ModelManager(get_preset("tiny", use_env=False), device="cpu", lora_dir=folder)
    base = pixels(generate(manager, OPTS).images["baseline"])
    adapted = generate(manager, OPTS, "clip.safetensors", 1.0)
    assert adapted.report["text_encoder_lora"] is True
    assert np.abs(pixels(adapted.images["lora"]) - base).mean() > 1.0
    assert np.array_equal(pixels(generate(manager, OPTS, "clip.safetensors", 0.0).images["lora"]), base)
