"""The exact delta each adapter kind encodes, as factors (B, A) with delta = B @ A, and PEFT's alpha from metadata."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

from fluxdemo.lora.keys import Adapter, Target

# ---------------------------------------------------------------------------------------------------------------
# Shapes and exact factors. A delta is always returned as (B, A) with delta = B @ A, B (out, k), A (k, in).


def _lokr_dims(keys: dict[str, str], shapes: Mapping[str, tuple[int, ...]], i: str) -> tuple[int, int, int] | None:
    """(rows, cols, inner rank) of LoKr factor w1 or w2 from the header alone, or None if its keys are incomplete."""
    names = [f"lokr_w{i}"] if f"lokr_w{i}" in keys else [f"lokr_w{i}_a", f"lokr_w{i}_b"]
    if any(n not in keys for n in names):
        return None
    if any(len(shapes[keys[n]]) != 2 for n in names):
        raise ValueError(f"has a LoKr factor w{i} that is not a matrix (convolution LoKr is not for FLUX)")
    if len(names) == 1:
        rows, cols = shapes[keys[names[0]]]
        return rows, cols, min(rows, cols)
    (rows, r), (r_b, cols) = shapes[keys[names[0]]], shapes[keys[names[1]]]
    if r != r_b:
        raise ValueError(f"has LoKr halves w{i}_a and w{i}_b of different ranks ({r}, {r_b})")
    return rows, cols, r


def delta_shape(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[int, int], int, int]:
    """((out, in), trained rank, rank of our exact (B, A) form) from header shapes; raises ValueError if malformed."""
    k, kind = adapter.keys, adapter.kind
    if kind == "lora":
        if "down" not in k or "up" not in k:
            raise ValueError("has only one half of the lora_A/lora_B (down/up) pair")
        down, up = shapes[k["down"]], shapes[k["up"]]
        if len(down) != 2 or len(up) != 2 or up[1] != down[0] or 0 in down or 0 in up:
            raise ValueError(f"down {list(down)} and up {list(up)} do not form a rank-r pair (r >= 1)")
        return (up[0], down[1]), down[0], down[0]
    if kind == "loha":
        need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if any(r not in k for r in need):
            raise ValueError("is a LoHa missing one of hada_w1_a/w1_b/w2_a/w2_b")
        if any(len(shapes[k[r]]) != 2 or 0 in shapes[k[r]] for r in need):
            raise ValueError("has LoHa factors that are not non-empty matrices")
        (o1, r1), (_, i1), (o2, r2), (_, i2) = (shapes[k[r]] for r in need)
        if o1 != o2 or i1 != i2 or shapes[k["hada_w1_b"]][0] != r1 or shapes[k["hada_w2_b"]][0] != r2:
            raise ValueError("has LoHa factors whose shapes do not agree")
        return (o1, i1), r1, min(r1 * r2, i1)
    if kind == "lokr":
        w1, w2 = _lokr_dims(k, shapes, "1"), _lokr_dims(k, shapes, "2")
        if w1 is None or w2 is None:
            raise ValueError("is a LoKr missing lokr_w1 or lokr_w2 (or their _a/_b halves)")
        if 0 in w1 or 0 in w2:
            raise ValueError("has an empty LoKr factor")
        decomposed = [k[f"lokr_w{i}_b"] for i in "21" if f"lokr_w{i}_b" in k]
        rank = shapes[decomposed[0]][0] if decomposed else 0  # LyCORIS' lora_dim; 0: both factors full
        out, inp = w1[0] * w2[0], w1[1] * w2[1]
        return (out, inp), rank, min(w1[2] * w2[2], inp)
    if kind == "full":
        diff = shapes[k["diff"]]
        if len(diff) != 2 or 0 in diff:
            raise ValueError(f"has a full delta (.diff) of shape {list(diff)}, not a non-empty matrix")
        return (diff[0], diff[1]), 0, min(diff)
    if kind == "bias" and adapter.resolved.target.shape is not None:
        return adapter.resolved.target.shape, 0, 1  # applied as a zero rank-1 pair carrying the bias
    raise ValueError(f"is a {kind} adapter")


def factors(adapter: Adapter, t: Mapping[str, torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact (B, A) with B @ A = scale * the delta of a LoRA, full or bias adapter, in float32 (float64 stays).

    LoKr and LoHa are not turned into pairs: their exact rank can reach the layer's width; see fluxdemo.lora.lycoris.
    """
    k = adapter.keys
    f = {
        role: t[key].to(torch.promote_types(t[key].dtype, torch.float32)) for role, key in k.items() if role != "alpha"
    }
    if adapter.kind == "lora":
        return f["up"] * scale, f["down"]
    if adapter.kind == "full":  # the dense delta against an identity on its smaller side: exact, rank min(out, in)
        d = f["diff"] * scale
        out, inp = d.shape
        return (d, torch.eye(inp, dtype=d.dtype)) if inp <= out else (torch.eye(out, dtype=d.dtype), d)
    if adapter.kind == "bias":  # PEFT adds lora_B's bias, times the strength, to the output: bias += s * diff_b
        out, inp = adapter.resolved.target.shape
        return torch.zeros(out, 1), torch.zeros(1, inp)
    raise ValueError(f"{adapter.module} is a {adapter.kind} adapter: applied in factored form (fluxdemo.lora.lycoris)")


def split_parts(
    target: Target, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """diffusers module -> (B rows, A, bias rows or None): a fused BFL linear splits by output rows and shares A."""
    rows = [r for _, r in target.parts]
    out = []
    for rowwise in (up, bias):
        if rowwise is not None and target.swap_halves:
            half = rowwise.shape[0] // 2
            rowwise = torch.cat([rowwise[half:], rowwise[:half]])
        out.append(torch.split(rowwise, rows) if rowwise is not None else [None] * len(rows))
    return {
        name: (b.contiguous(), down, None if c is None else c.contiguous())
        for (name, _), b, c in zip(target.parts, *out, strict=True)
    }


PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default: what diffusers uses when lora_adapter_metadata omits lora_alpha


def peft_alpha(meta: Mapping[str, str], component: str, module: str) -> tuple[float, bool] | None:
    """(lora_alpha, use_rslora) from diffusers' lora_adapter_metadata for one module; None without metadata."""
    try:
        config = json.loads(meta.get("lora_adapter_metadata") or "null")
    except (ValueError, RecursionError):  # RecursionError: a crafted nesting bomb
        return None
    if not isinstance(config, dict):
        return None
    # Pipeline-level saves prefix every field with the component ("transformer.lora_alpha"); model-level ones do not.
    scoped = {k.removeprefix(f"{component}."): v for k, v in config.items() if k.startswith(f"{component}.")}
    config = scoped or config
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    patterns = config.get("alpha_pattern") or {}
    for pattern, value in patterns.items() if isinstance(patterns, dict) else ():
        # PEFT's rule, (.*\.)?(pattern)$, with the key as a plain module name (what diffusers writes): as a regex, a
        # crafted key such as "(.*)*x" backtracks for hours and would hang the process that inspects the file.
        if module == pattern or module.endswith(f".{pattern}"):
            alpha = value
    # A non-number is damaged metadata: NaN makes the caller refuse the file ("its alpha is nan").
    return (float(alpha) if isinstance(alpha, (int, float)) else math.nan), bool(config.get("use_rslora"))
