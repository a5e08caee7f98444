"""Builders for LoRA test files (LyCORIS, wrong-model and broken files) and the hand reference a conversion must meet.

Kept apart from fluxdemo: the reference here is written from the formats' definitions, not from the converter.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fluxdemo.model.names import SWAPPED_HALVES, FluxDims, fused_map, linear_map
from fluxdemo.model.tiny import TINY_TRANSFORMER, WIDE_TRANSFORMER
from fluxdemo.model.tiny_loras import Pair, canonical_pairs

TINY, WIDE = FluxDims.from_config(TINY_TRANSFORMER), FluxDims.from_config(WIDE_TRANSFORMER)  # the kits' own
CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2)
# At real width a few modules cover every kind of mapping: fused qkv, fused linear1 (q,k,v + mlp), swapped halves and
# an embedder (the tiny runs cover every module); ranks stay tiny.
WIDE_MODULES = ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1", "img_in")


def save(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    # clone: safetensors refuses tensors that share storage (the parts of a fused module share one lora_down)
    save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
    return path


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def reference_merge(weights: Mapping[str, torch.Tensor], converted, strength: float) -> dict[str, torch.Tensor]:
    """W + strength * B @ A for every module in `weights` ("transformer.<module>"), from a ConvertedLora."""
    sd = {**converted.transformer, **converted.text_encoder}
    merged = {}
    for module, w in weights.items():
        a, b = sd.get(f"{module}.lora_A.weight"), sd.get(f"{module}.lora_B.weight")
        merged[module] = w.clone() if a is None else torch.addmm(w, b.to(w.dtype), a.to(w.dtype), alpha=strength)
    return merged


def expected_merge(weights: Mapping[str, torch.Tensor], pairs: Mapping[str, Pair], strength: float) -> dict:
    """The hand reference: W + strength * (alpha / rank) * up @ down, straight from the canonical pairs."""
    merged = {}
    for module, w in weights.items():
        p = pairs[module]
        scale = 1.0 if p.alpha is None else p.alpha / p.down.shape[0]
        merged[module] = torch.addmm(w, p.up, p.down, alpha=strength * scale)
    return merged


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.dist(got, want) / want.norm())


# --- LyCORIS -------------------------------------------------------------------------------------------------------


def diffusers_rows(bfl: str, dims: FluxDims) -> list[tuple[str, int]]:
    """The diffusers modules a BFL module's output rows become, in order (what the reference splits a delta into)."""
    if bfl in fused_map(dims):
        return list(fused_map(dims)[bfl].parts)
    diff = linear_map(dims)[bfl]
    return [(diff, -1)]


def split_delta(bfl: str, delta: torch.Tensor, dims: FluxDims) -> dict[str, torch.Tensor]:
    """A BFL module's delta as per-diffusers-module deltas: rows split, final-layer halves swapped."""
    if bfl in SWAPPED_HALVES:
        half = delta.shape[0] // 2
        delta = torch.cat([delta[half:], delta[:half]])
    rows = diffusers_rows(bfl, dims)
    if rows[0][1] == -1:
        return {f"transformer.{rows[0][0]}": delta}
    return {f"transformer.{m}": d for (m, _), d in zip(rows, torch.split(delta, [r for _, r in rows]), strict=True)}


def lokr(out_in: tuple[int, int], w1: tuple[int, int], rank2: int | None, rank1: int | None, g: torch.Generator):
    """LoKr tensors for a module: w1 of shape `w1` (full, or rank1-decomposed), w2 the rest (full or rank2)."""
    (out, inp), (a, b) = out_in, w1
    c, d = out // a, inp // b
    t = {}
    if rank1:
        t["lokr_w1_a"], t["lokr_w1_b"] = torch.randn(a, rank1, generator=g), torch.randn(rank1, b, generator=g)
    else:
        t["lokr_w1"] = torch.randn(a, b, generator=g)
    if rank2:
        t["lokr_w2_a"] = torch.randn(c, rank2, generator=g) / c**0.5
        t["lokr_w2_b"] = torch.randn(rank2, d, generator=g) / d**0.5
    else:
        t["lokr_w2"] = torch.randn(c, d, generator=g) / (c * d) ** 0.25
    return t


def lokr_delta(t: Mapping[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """LyCORIS: kron(w1, w2) * alpha / rank, where a factor may be stored as a @ b; both factors full -> scale 1."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    scale = 1.0 if alpha is None or rank is None else alpha / rank
    return torch.kron(w1, w2) * scale


def loha(out_in: tuple[int, int], rank: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    out, inp = out_in
    return {
        "hada_w1_a": torch.randn(out, rank, generator=g) / rank**0.5,
        "hada_w1_b": torch.randn(rank, inp, generator=g) / inp**0.5,
        "hada_w2_a": torch.randn(out, rank, generator=g),
        "hada_w2_b": torch.randn(rank, inp, generator=g),
    }


def loha_delta(t: Mapping[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """LyCORIS: (w1a @ w1b) * (w2a @ w2b) * alpha / rank."""
    d = (t["hada_w1_a"].double() @ t["hada_w1_b"].double()) * (t["hada_w2_a"].double() @ t["hada_w2_b"].double())
    return d * (1.0 if alpha is None else alpha / t["hada_w1_b"].shape[0])


# --- other models and broken files ---------------------------------------------------------------------------------


def sdxl_kohya(path: Path) -> Path:
    """A kohya SDXL LoRA: UNet blocks, CLIP-L (te1) and CLIP-G (te2), cross-attention on 2048-wide context."""
    t = {}
    for base, (out, inp) in {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (640, 2048),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (640, 640),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
    }.items():
        t |= {f"{base}.lora_down.weight": torch.zeros(4, inp), f"{base}.lora_up.weight": torch.zeros(out, 4)}
        t[f"{base}.alpha"] = torch.tensor(4.0)
    return save(path, t, {"ss_base_model_version": "sdxl_base_v1-0"})


def sdxl_diffusers(path: Path) -> Path:
    """An SDXL LoRA in diffusers naming: the kind diffusers loads onto FLUX as a silent no-op."""
    t = {}
    for module, (out, inp) in {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048),
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (1280, 1280),
    }.items():
        t |= {f"{module}.lora_A.weight": torch.zeros(4, inp), f"{module}.lora_B.weight": torch.zeros(out, 4)}
    return save(path, t)


def sd15_kohya(path: Path) -> Path:
    t = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
    }
    return save(path, t)


def control_lora(path: Path, dims: FluxDims, in_channels: int = 128) -> Path:
    """A BFL Canny/Depth (128) or Fill (384) LoRA: bare BFL names, img_in widened, full norm scales alongside."""
    d = dims.inner
    t = {
        "img_in.lora_A.weight": torch.randn(2, in_channels),
        "img_in.lora_B.weight": torch.randn(d, 2),
        "double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(2, d),
        "double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(d, 2),
        "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(d // 2),
    }
    return save(path, t)


def no_lora(path: Path) -> Path:
    return save(path, {"model.embed.weight": torch.zeros(4, 4), "model.norm.scale": torch.ones(4)})


def pickled(path: Path) -> Path:
    """A plain pickle (protocol 4, starts with 0x80) named .safetensors."""
    path.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": [[0.0]]}, protocol=4))
    return path


def torch_zip(path: Path) -> Path:
    """What torch.save writes (a zip of pickles, starts with PK), named .safetensors."""
    torch.save({"w": torch.zeros(2)}, str(path))
    return path


def raw(path: Path, header: dict, data: bytes) -> Path:
    """A file with exactly this header and data section, whatever they claim."""
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


# --- pictures: the hand merge as activations -----------------------------------------------------------------------


class HandMerge:
    """Adds strength * (x @ delta.T + bias delta) to each listed transformer module's output: W + s * delta applied by
    hand, with no adapter machinery, on whatever (packed GGUF) weights the model holds. Use as a context manager."""

    def __init__(self, transformer, deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]], strength: float):
        self.transformer, self.deltas, self.strength, self.hooks = transformer, deltas, strength, []

    def __enter__(self) -> HandMerge:
        for module, (delta, bias) in self.deltas.items():

            def hook(_m, args, out, delta=delta, bias=bias):
                extra = torch.nn.functional.linear(
                    args[0], delta.to(out.dtype), None if bias is None else bias.to(out.dtype)
                )
                return out + self.strength * extra

            self.hooks.append(
                self.transformer.get_submodule(module.removeprefix("transformer.")).register_forward_hook(hook)
            )
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()


def pairs_for(fmt: str, dims: FluxDims, seed: int = 0) -> dict[str, Pair]:
    wide = dims == WIDE
    if fmt == "xlabs":  # XLabs files store no alpha and adapt only attention
        return canonical_pairs(dims, rank=2, seed=seed, xlabs=True)
    return canonical_pairs(
        dims,
        CLIP,
        rank=2 if wide else 3,
        seed=seed,
        alphas=(None, 1.0, 6.0),
        modules=(lambda b: b in WIDE_MODULES) if wide else (lambda b: True),
    )


def comfy_save(dims: FluxDims, g: torch.Generator, dtype=torch.float16, size: float = 1.0) -> tuple[dict, dict]:
    """What ComfyUI's LoraSave writes (bias_diff=True, its default): lora_up/down per changed weight, diff_b per bias;
    the FULL_DIFF type writes .diff instead. Returns the tensors and, per BFL module, (delta, bias delta).

    Entries shrink with the input width no faster than fp8 can follow: e4m3 holds nothing below 2**-9, so a
    real-width delta of size 1/width would be all zeros in it, and an fp8 file would test nothing."""
    d = dims.inner
    shapes = {"double_blocks.0.img_attn.qkv": (3 * d, d), "single_blocks.0.linear2": (d, d + dims.mlp),
              "final_layer.adaLN_modulation.1": (2 * d, d), "txt_in": (d, dims.joint_attention_dim),
              "double_blocks.0.txt_mlp.0": (dims.mlp, d)}  # fmt: skip
    t, want = {}, {}
    for i, (bfl, (out, inp)) in enumerate(shapes.items()):
        p = f"diffusion_model.{bfl}"
        bias = (torch.randn(out, generator=g) * 0.1 * size).to(dtype)
        t[f"{p}.diff_b"] = bias
        if i % 3 == 0:  # a LoRA plus its bias delta
            up = (torch.randn(out, 2, generator=g) * size / inp**0.5).to(dtype)
            down = (torch.randn(2, inp, generator=g) / inp**0.5).to(dtype)
            t |= {f"{p}.lora_up.weight": up, f"{p}.lora_down.weight": down}
            want[bfl] = (up.float() @ down.float(), bias.float())
        elif i % 3 == 1:  # FULL_DIFF: the whole weight delta
            diff = (torch.randn(out, inp, generator=g) * size / inp**0.75).to(dtype)
            t[f"{p}.diff"] = diff
            want[bfl] = (diff.float(), bias.float())
        else:  # only the bias changed
            want[bfl] = (torch.zeros(out, inp), bias.float())
    return t, want
