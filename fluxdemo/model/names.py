"""Module names of the FLUX transformer: the original Black Forest Labs (BFL) layout vs diffusers'.

GGUF files (city96), kohya/ComfyUI/XLabs LoRAs all speak BFL names; diffusers speaks its own. diffusers' converters
hard-code the real width (3072), so tiny test models and LoRA validation need this width-agnostic table instead.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FluxDims:
    """The sizes that decide every module's shape; read from a diffusers transformer config."""

    inner: int  # num_attention_heads * attention_head_dim (3072 for FLUX.1-dev)
    mlp: int  # inner * 4
    num_double: int
    num_single: int
    in_channels: int
    joint_attention_dim: int
    pooled_projection_dim: int
    guidance: bool

    @classmethod
    def from_config(cls, config: dict) -> FluxDims:
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        return cls(
            inner=inner,
            mlp=int(inner * config.get("mlp_ratio", 4.0)),
            num_double=config["num_layers"],
            num_single=config["num_single_layers"],
            in_channels=config["in_channels"],
            joint_attention_dim=config["joint_attention_dim"],
            pooled_projection_dim=config["pooled_projection_dim"],
            guidance=config.get("guidance_embeds", False),
        )


@dataclass(frozen=True)
class Fused:
    """One BFL linear that diffusers splits row-wise into several modules (sizes in output rows)."""

    bfl: str
    parts: tuple[tuple[str, int], ...]


def _top_level(d: FluxDims) -> dict[str, str]:
    table = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "final_layer.linear": "proj_out",
        # diffusers stores this one's output halves as (scale, shift), BFL as (shift, scale): see SWAPPED_HALVES.
        "final_layer.adaLN_modulation.1": "norm_out.linear",
    }
    if d.guidance:
        table["guidance_in.in_layer"] = "time_text_embed.guidance_embedder.linear_1"
        table["guidance_in.out_layer"] = "time_text_embed.guidance_embedder.linear_2"
    return table


SWAPPED_HALVES = frozenset({"final_layer.adaLN_modulation.1"})


def _double_block(i: int) -> dict[str, str]:
    b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
    return {
        f"{b}.img_mod.lin": f"{t}.norm1.linear",
        f"{b}.txt_mod.lin": f"{t}.norm1_context.linear",
        f"{b}.img_attn.proj": f"{t}.attn.to_out.0",
        f"{b}.txt_attn.proj": f"{t}.attn.to_add_out",
        f"{b}.img_mlp.0": f"{t}.ff.net.0.proj",
        f"{b}.img_mlp.2": f"{t}.ff.net.2",
        f"{b}.txt_mlp.0": f"{t}.ff_context.net.0.proj",
        f"{b}.txt_mlp.2": f"{t}.ff_context.net.2",
    }


def _single_block(i: int) -> dict[str, str]:
    b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    return {f"{b}.modulation.lin": f"{t}.norm.linear", f"{b}.linear2": f"{t}.proj_out"}


def linear_map(d: FluxDims) -> dict[str, str]:
    """BFL linear module name -> diffusers linear module name, for every linear that maps one to one."""
    table = _top_level(d)
    for i in range(d.num_double):
        table.update(_double_block(i))
    for i in range(d.num_single):
        table.update(_single_block(i))
    return table


def fused_map(d: FluxDims) -> dict[str, Fused]:
    """BFL linear module name -> the diffusers modules it is split into, in row order."""
    table: dict[str, Fused] = {}
    for i in range(d.num_double):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        table[f"{b}.img_attn.qkv"] = Fused(
            f"{b}.img_attn.qkv", ((f"{t}.to_q", d.inner), (f"{t}.to_k", d.inner), (f"{t}.to_v", d.inner))
        )
        table[f"{b}.txt_attn.qkv"] = Fused(
            f"{b}.txt_attn.qkv",
            ((f"{t}.add_q_proj", d.inner), (f"{t}.add_k_proj", d.inner), (f"{t}.add_v_proj", d.inner)),
        )
    for i in range(d.num_single):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        table[f"{b}.linear1"] = Fused(
            f"{b}.linear1",
            (
                (f"{t}.attn.to_q", d.inner),
                (f"{t}.attn.to_k", d.inner),
                (f"{t}.attn.to_v", d.inner),
                (f"{t}.proj_mlp", d.mlp),
            ),
        )
    return table


def norm_map(d: FluxDims) -> dict[str, str]:
    """BFL RMSNorm scale tensors -> diffusers norm weights (no linear, so never a LoRA target)."""
    table = {}
    for i in range(d.num_double):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        table[f"{b}.img_attn.norm.query_norm.scale"] = f"{t}.norm_q.weight"
        table[f"{b}.img_attn.norm.key_norm.scale"] = f"{t}.norm_k.weight"
        table[f"{b}.txt_attn.norm.query_norm.scale"] = f"{t}.norm_added_q.weight"
        table[f"{b}.txt_attn.norm.key_norm.scale"] = f"{t}.norm_added_k.weight"
    for i in range(d.num_single):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}.attn"
        table[f"{b}.norm.query_norm.scale"] = f"{t}.norm_q.weight"
        table[f"{b}.norm.key_norm.scale"] = f"{t}.norm_k.weight"
    return table


def bfl_linear_shapes(d: FluxDims) -> dict[str, tuple[int, int]]:
    """Every BFL linear module -> (out_features, in_features): what a LoRA for this model must fit."""
    D, M = d.inner, d.mlp
    shapes = {
        "img_in": (D, d.in_channels),
        "txt_in": (D, d.joint_attention_dim),
        "time_in.in_layer": (D, 256),
        "time_in.out_layer": (D, D),
        "vector_in.in_layer": (D, d.pooled_projection_dim),
        "vector_in.out_layer": (D, D),
        "final_layer.linear": (d.in_channels, D),  # patch_size 1: out = in_channels
        "final_layer.adaLN_modulation.1": (2 * D, D),
    }
    if d.guidance:
        shapes["guidance_in.in_layer"] = (D, 256)
        shapes["guidance_in.out_layer"] = (D, D)
    for i in range(d.num_double):
        b = f"double_blocks.{i}"
        for side in ("img", "txt"):
            shapes[f"{b}.{side}_mod.lin"] = (6 * D, D)
            shapes[f"{b}.{side}_attn.qkv"] = (3 * D, D)
            shapes[f"{b}.{side}_attn.proj"] = (D, D)
            shapes[f"{b}.{side}_mlp.0"] = (M, D)
            shapes[f"{b}.{side}_mlp.2"] = (D, M)
    for i in range(d.num_single):
        b = f"single_blocks.{i}"
        shapes[f"{b}.modulation.lin"] = (3 * D, D)
        shapes[f"{b}.linear1"] = (3 * D + M, D)
        shapes[f"{b}.linear2"] = (D, D + M)
    return shapes
