"""Sample LoRAs in the real key formats, written from one canonical set of per-diffusers-module (A, B, alpha) pairs.

The tiny kits put one file per format in their loras/ folder; the tests write the same formats at real width and
check that fluxdemo.lora converts each back to exactly the canonical pairs. Fused BFL modules (qkv, linear1) are
written the way trainers write them: one lora_down shared by the parts and the parts' lora_up rows concatenated, so
the canonical set gives every part of a fused module the same A and alpha.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxdemo.model.names import SWAPPED_HALVES, FluxDims, bfl_linear_shapes, fused_map, linear_map


@dataclass(frozen=True)
class Pair:
    """One diffusers module's LoRA: delta = (alpha / rank) * up @ down; alpha None means scale 1."""

    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)
    alpha: float | None


def _xlabs_modules(dims: FluxDims) -> dict[str, tuple[str, ...]]:
    """The BFL modules XLabs adapts, with the diffusers parts each covers (single blocks: linear1's q,k,v only)."""
    fused, plain = fused_map(dims), linear_map(dims)
    table = {}
    for i in range(dims.num_double):
        for side in ("img", "txt"):
            table[f"double_blocks.{i}.{side}_attn.qkv"] = tuple(
                p for p, _ in fused[f"double_blocks.{i}.{side}_attn.qkv"].parts
            )
            table[f"double_blocks.{i}.{side}_attn.proj"] = (plain[f"double_blocks.{i}.{side}_attn.proj"],)
    for i in range(dims.num_single):
        table[f"single_blocks.{i}.linear1"] = tuple(p for p, _ in fused[f"single_blocks.{i}.linear1"].parts[:3])
        table[f"single_blocks.{i}.linear2"] = (plain[f"single_blocks.{i}.linear2"],)
    return table


def canonical_pairs(
    dims: FluxDims,
    clip_config: Mapping | None = None,
    *,
    rank: int = 4,
    seed: int = 0,
    modules: Callable[[str], bool] = lambda bfl: True,
    xlabs: bool = False,
    alphas: tuple[float | None, ...] = (None,),
    magnitude: float = 0.5,
) -> dict[str, Pair]:
    """Random pairs keyed "transformer.<diffusers module>" / "text_encoder.<CLIP module>", deterministic from seed.

    modules picks BFL module names; xlabs limits them to what XLabs files can hold; alphas are cycled over modules
    (None = no alpha, scale 1). B is non-zero: delta entries are about `magnitude` times a default Linear's weights.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = bfl_linear_shapes(dims)
    fused, plain = fused_map(dims), linear_map(dims)
    if xlabs:
        groups = _xlabs_modules(dims)
    else:
        groups = {bfl: tuple(p for p, _ in fused[bfl].parts) if bfl in fused else (plain[bfl],) for bfl in shapes}
    pairs: dict[str, Pair] = {}
    n = 0
    for bfl, parts in groups.items():
        if not modules(bfl):
            continue
        down = torch.randn(rank, shapes[bfl][1], generator=g) / shapes[bfl][1] ** 0.5
        alpha = alphas[n % len(alphas)]
        n += 1
        for part in parts:
            rows = dict(fused[bfl].parts)[part] if bfl in fused else shapes[bfl][0]
            up = torch.randn(rows, rank, generator=g) * magnitude / rank**0.5
            pairs[f"transformer.{part}"] = Pair(down, up, alpha)
    if clip_config is not None:
        hidden, inter = clip_config["hidden_size"], clip_config["intermediate_size"]
        for name, (out, inp) in {
            "self_attn.q_proj": (hidden, hidden),
            "self_attn.k_proj": (hidden, hidden),
            "self_attn.v_proj": (hidden, hidden),
            "self_attn.out_proj": (hidden, hidden),
            "mlp.fc1": (inter, hidden),
            "mlp.fc2": (hidden, inter),
        }.items():
            down = torch.randn(rank, inp, generator=g) / inp**0.5
            up = torch.randn(out, rank, generator=g) * magnitude / rank**0.5
            pairs[f"text_encoder.text_model.encoder.layers.0.{name}"] = Pair(down, up, alphas[n % len(alphas)])
            n += 1
    return pairs


def _bfl_pairs(pairs: Mapping[str, Pair], dims: FluxDims, xlabs: bool = False) -> dict[str, Pair]:
    """The transformer pairs regrouped under BFL names: fused parts concatenated (they share A), halves swapped."""
    out = {}
    for bfl, fused in fused_map(dims).items():
        # XLabs adapts only the q,k,v rows of a single block's linear1; every other file adapts whole modules.
        parts = fused.parts[:3] if xlabs and bfl.endswith("linear1") else fused.parts
        present = [pairs[f"transformer.{p}"] for p, _ in parts if f"transformer.{p}" in pairs]
        if not present:
            continue
        if len(present) != len(parts) or any(p.down is not present[0].down for p in present):
            raise ValueError(f"{bfl}: the parts of a fused module must all be present and share one lora_down")
        out[bfl] = Pair(present[0].down, torch.cat([p.up for p in present]), present[0].alpha)
    for bfl, diff in linear_map(dims).items():
        pair = pairs.get(f"transformer.{diff}")
        if pair is not None:
            up = pair.up
            if bfl in SWAPPED_HALVES:
                half = up.shape[0] // 2
                up = torch.cat([up[half:], up[:half]])
            out[bfl] = Pair(pair.down, up, pair.alpha)
    return out


def _named(pairs: Mapping[str, Pair], dims: FluxDims, unet: Callable, clip: Callable, down: str, up: str) -> dict:
    """BFL-named transformer pairs and CLIP pairs, each spelled by its naming function, with .alpha where given."""
    named = {unet(bfl): p for bfl, p in _bfl_pairs(pairs, dims).items()}
    named |= {clip(k.removeprefix("text_encoder.")): p for k, p in pairs.items() if k.startswith("text_encoder.")}
    tensors: dict[str, torch.Tensor] = {}
    for base, p in named.items():
        tensors[f"{base}.{down}"], tensors[f"{base}.{up}"] = p.down, p.up
        if p.alpha is not None:
            tensors[f"{base}.alpha"] = torch.tensor(float(p.alpha))
    return tensors


def _kohya(pairs: Mapping[str, Pair], dims: FluxDims) -> tuple[dict, dict]:
    tensors = _named(
        pairs,
        dims,
        lambda bfl: "lora_unet_" + bfl.replace(".", "_"),
        lambda clip: "lora_te1_" + clip.replace(".", "_"),
        "lora_down.weight",
        "lora_up.weight",
    )
    meta = {
        "ss_network_module": "networks.lora_flux",
        "ss_base_model_version": "flux1",
        "ss_tag_frequency": json.dumps({"10_tinycat": {"tinycat": 12, "a cat": 9, "sofa": 3}}),
    }
    return tensors, meta


def _peft(pairs: Mapping[str, Pair], dims: FluxDims) -> tuple[dict, dict]:
    """diffusers' own naming; alphas go where diffusers puts them, in lora_adapter_metadata (alpha_pattern)."""
    tensors, meta = {}, {}
    for component in ("transformer", "text_encoder"):
        mine = {k.removeprefix(f"{component}."): p for k, p in pairs.items() if k.startswith(f"{component}.")}
        if not mine:
            continue
        for module, p in mine.items():
            tensors[f"{component}.{module}.lora_A.weight"] = p.down
            tensors[f"{component}.{module}.lora_B.weight"] = p.up
        first = next(iter(mine.values()))
        rank, alpha = first.down.shape[0], first.alpha if first.alpha is not None else first.down.shape[0]
        pattern = {m: (p.alpha if p.alpha is not None else rank) for m, p in mine.items()}
        meta |= {
            f"{component}.r": rank,
            f"{component}.lora_alpha": alpha,
            f"{component}.alpha_pattern": {m: a for m, a in pattern.items() if a != alpha},
            f"{component}.target_modules": sorted(mine),
        }
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}


def _xlabs(pairs: Mapping[str, Pair], dims: FluxDims) -> tuple[dict, dict]:
    """XLabs' processor names: lora1 = image stream, lora2 = text stream; no alphas."""
    tensors = {}
    for bfl, p in _bfl_pairs(pairs, dims, xlabs=True).items():
        kind, i, *rest = bfl.split(".")
        if p.alpha is not None:
            raise ValueError("XLabs files store no alpha: build them with alphas=(None,)")
        if kind == "double_blocks":
            side, what = rest[0].split("_")[0], rest[1]
            name = f"{kind}.{i}.processor.{what}_lora{1 if side == 'img' else 2}"
        else:
            name = f"{kind}.{i}.processor.{'qkv' if rest[0] == 'linear1' else 'proj'}_lora"
        tensors[f"{name}.down.weight"], tensors[f"{name}.up.weight"] = p.down, p.up
    return tensors, {}


# format -> (tensors, metadata) builder; "comfy" is ComfyUI's own naming, "bfl" the bare BFL names of BFL's and
# fal's releases, "fal" fal/Kontext's PEFT-wrapped BFL names.
FORMATS: dict[str, Callable[[Mapping[str, Pair], FluxDims], tuple[dict, dict]]] = {
    "peft": _peft,
    "kohya": _kohya,
    "comfy": lambda pairs, dims: (
        _named(
            pairs,
            dims,
            "diffusion_model.{}".format,
            "text_encoders.clip_l.transformer.{}".format,
            "lora_down.weight",
            "lora_up.weight",
        ),
        {},
    ),
    "bfl": lambda pairs, dims: (
        _named(pairs, dims, "{}".format, "text_encoder.{}".format, "lora_A.weight", "lora_B.weight"),
        {},
    ),
    "fal": lambda pairs, dims: (
        _named(pairs, dims, "base_model.model.{}".format, "text_encoder.{}".format, "lora_A.weight", "lora_B.weight"),
        {},
    ),
    "xlabs": _xlabs,
}


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def write_lora(
    path: Path, fmt: str, pairs: Mapping[str, Pair], dims: FluxDims, metadata: Mapping | None = None
) -> Path:
    """Write the pairs in one of FORMATS as a byte-for-byte reproducible safetensors file; returns the path.

    Our own writer because safetensors serialises __metadata__ from a hash map: its key order, and so the file's
    bytes and the kit's checksums, would change from call to call.
    """
    tensors, meta = FORMATS[fmt](pairs, dims)
    header: dict = {"__metadata__": {k: str(v) for k, v in sorted({**meta, **(metadata or {})}.items())}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # like safetensors: the data section starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
    return path


def write_sample_loras(out_dir: Path, transformer_config: dict, clip_config: dict, seed: int = 0) -> dict[str, Path]:
    """Write one sample LoRA per supported format into out_dir; returns {format name: path}.

    Each adapts every linear inside the blocks (what trainers adapt by default); kohya also adapts CLIP-L, and
    uses alpha = rank/2 so its scale is not 1. Deterministic from seed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    dims = FluxDims.from_config(transformer_config)
    blocks = lambda bfl: bfl.startswith(("double_blocks.", "single_blocks."))  # noqa: E731
    plans = {
        "peft": canonical_pairs(dims, rank=4, seed=seed, modules=blocks),
        "kohya": canonical_pairs(
            dims, clip_config, rank=4, seed=seed + 1, modules=blocks, alphas=(2.0,), magnitude=1.0
        ),
        "comfy": canonical_pairs(dims, rank=4, seed=seed + 2, modules=blocks, alphas=(4.0,)),
        "xlabs": canonical_pairs(dims, rank=4, seed=seed + 3, xlabs=True),
    }
    meta = {"modelspec.trigger_phrase": "tinycat", "modelspec.architecture": "flux-1-dev/lora"}
    return {fmt: write_lora(out_dir / f"{fmt}.safetensors", fmt, pairs, dims, meta) for fmt, pairs in plans.items()}
