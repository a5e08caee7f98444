"""LoRA files inspected and converted exactly to diffusers' PEFT keys, width-agnostic (our own converter: diffusers'
kohya and BFL converters hard-code width 3072 and 19/38 blocks). The per-module scale is folded into lora_B, so the
result loads with adapter weight = strength and means W + strength * B @ A exactly. Nothing here unpickles."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxdemo.errors import LoraError
from fluxdemo.lora.deltas import factors, split_parts
from fluxdemo.lora.header import META_KEYS, TORCH_DTYPES, bad_file, file_sha256, read_safetensors_header
from fluxdemo.lora.keys import Adapter, ModelTables
from fluxdemo.lora.lycoris import FactoredPart
from fluxdemo.lora.report import (
    REPORT_MAX_CHARS,
    LoraReport,
    _flux_dev_clip,
    _model_label,
    _summary,
    _trigger_words,
    flux_dev_dims,
    paths_to_file_names,
)
from fluxdemo.lora.verdict import analyse_keys
from fluxdemo.lru import LRU
from fluxdemo.model.names import FluxDims

logger = logging.getLogger(__name__)

# (sha256, name, dims, CLIP config) -> (report, plan): a file is inspected by the library, then converted when picked;
# the verdict depends only on its bytes and the model, so the second pass reuses the first.
_ANALYSES = LRU(maxsize=8)


def _analyse(shapes, dtypes, meta, read, dims, clip_config, identity: tuple[str, str, int]) -> tuple:
    """(report, plan): the key verdict (lora.verdict) plus what the metadata says."""
    key = (identity, dims, json.dumps(clip_config, sort_keys=True, default=str)) if identity[1] else None
    cached = _ANALYSES.get(key) if key is not None else None
    if cached is not None:
        return cached
    result = _analyse_uncached(shapes, dtypes, meta, read, dims, clip_config, identity)
    if key is not None:
        _ANALYSES.put(key, result)
    return result


def _analyse_uncached(shapes, dtypes, meta, read, dims, clip_config, identity: tuple[str, str, int]) -> tuple:
    k = analyse_keys(shapes, dtypes, meta, read, ModelTables(dims, clip_config), _model_label(dims))
    hint = next(
        (
            paths_to_file_names(meta[key][:2000])[:REPORT_MAX_CHARS]
            for key in ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name")
            if meta.get(key)
        ),
        "FLUX.1 (from its key names)" if k.plan else "",
    )
    if "schnell" in hint.lower():
        k.warnings.append(
            f"trained on FLUX.1-schnell ({hint}): it loads on FLUX.1-dev, but was made for 1-4 step sampling, so "
            "expect a different strength"
        )
    elif k.plan and "flux" not in hint.lower():
        k.warnings.append(f"its metadata names {hint!r} as the base model, but its keys are FLUX.1's")
    name, sha256, size = identity
    report = LoraReport(
        name=name,
        format=k.format,
        naming=k.naming,
        rank=_summary(k.ranks),
        alpha=_summary(k.alphas),
        scale=_summary(k.scales),
        targets=sum(k.modules.values()),
        modules=dict(sorted(k.modules.items())),
        text_encoder=bool(k.modules["clip"]),
        t5=k.t5,
        base_model_hint=hint,
        compatible=not k.problems,
        problems=k.problems,
        warnings=k.warnings,
        trigger_words=_trigger_words(meta),
        metadata={key: paths_to_file_names(meta[key][:2000])[:REPORT_MAX_CHARS] for key in META_KEYS if key in meta},
        matched=sorted(k.matched),
        unmatched=sorted(k.unmatched),
        sha256=sha256,
        size=size,
    )
    return report, k.plan


# --- public entry points ------------------------------------------------------------------------------------------


def inspect_lora(path: Path, dims: FluxDims | None = None, *, clip_config: Mapping | None = None) -> LoraReport:
    """The report for one file, from its header and the few scalars inspection needs; LoraError if unreadable."""
    with _source(Path(path)) as (read, shapes, dtypes, meta, identity):
        return _analyse(
            shapes, dtypes, meta, read, dims or flux_dev_dims(), clip_config or _flux_dev_clip(), identity
        )[0]


@contextmanager
def _source(path: Path) -> Iterator[tuple]:
    """(read, shapes, dtypes, metadata, identity) of a file whose header has been validated; tensors read on demand."""
    from safetensors import safe_open

    header = read_safetensors_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    identity = (path.name, file_sha256(path), path.stat().st_size)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors' own SafetensorError; rare, since our header check ran first
        raise bad_file(path, str(e)) from None
    with handle as f:
        shapes = {k: tuple(v["shape"]) for k, v in tensors.items()}
        yield (
            f.get_tensor,
            shapes,
            {k: v["dtype"] for k, v in tensors.items()},
            header.get("__metadata__", {}),
            identity,
        )


@dataclass(frozen=True)
class ConvertedLora:
    """PEFT-style diffusers keys with the scale folded into lora_B: load with adapter weight = strength.

    transformer: "transformer.<module>.lora_A.weight" / ".lora_B.weight"; text_encoder: "text_encoder.<module>...".
    The parts of a fused BFL linear share one lora_A tensor (copy before saving them with safetensors).
    """

    transformer: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    report: LoraReport
    # LoKr/LoHa modules, kept factored (lora.lycoris.attach): component -> parts. Each component with parts also
    # has at least one (zero) LoRA pair above, so that PEFT registers the adapter and its strength drives them all.
    factored: dict[str, list[FactoredPart]] = dataclasses.field(default_factory=dict)


def to_diffusers(
    path_or_tensors: Path | str | Mapping[str, torch.Tensor],
    dims: FluxDims,
    clip_config: Mapping | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> ConvertedLora:
    """Convert any supported LoRA exactly (W + strength * B @ A per module); raises LoraError with the problems.

    dtype: of the result. float32 by default: PEFT keeps adapters of a bf16/fp16 model in float32 anyway, and folding
    alpha / rank into a bf16 lora_B would round it once more.
    """
    if isinstance(path_or_tensors, Mapping):
        t = dict(path_or_tensors)
        identity = ("<tensors>", "", sum(v.numel() * v.element_size() for v in t.values()))
        shapes, dtypes = (
            {k: tuple(v.shape) for k, v in t.items()},
            {k: TORCH_DTYPES.get(v.dtype, "?") for k, v in t.items()},
        )
        return _convert(t.__getitem__, shapes, dtypes, metadata or {}, dims, clip_config, identity, dtype)
    with _source(Path(path_or_tensors)) as (read, shapes, dtypes, meta, identity):
        return _convert(read, shapes, dtypes, meta, dims, clip_config, identity, dtype)


def _convert(read, shapes, dtypes, meta, dims, clip_config, identity, dtype) -> ConvertedLora:
    cache: dict[str, torch.Tensor] = {}

    def cached(key: str) -> torch.Tensor:
        if key not in cache:
            cache[key] = read(key)
        return cache[key]

    report, plan = _analyse(shapes, dtypes, meta, cached, dims, clip_config or _flux_dev_clip(), identity)
    if not report.compatible:
        raise LoraError(f"{report.name} cannot be applied to {_model_label(dims)}: " + "; ".join(report.problems))
    out: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "text_encoder": {}}
    bad = []
    factored: dict[str, list[FactoredPart]] = {}
    for adapter, scale in plan:
        # fp8 (e4m3fn, e5m2) upcast: every fp8 value is exact in float32, and torch has little fp8 arithmetic on CPU
        tensors = {k: _upcast(cached(k)) for r, k in adapter.keys.items() if r != "alpha"}
        bad += [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
        if adapter.kind in ("lokr", "loha"):
            factored.setdefault(adapter.resolved.target.component, []).extend(_factored_parts(adapter, tensors, scale))
            continue
        up, down = factors(adapter, tensors, scale)
        bias = tensors.get(adapter.keys.get("diff_b", ""))  # ComfyUI applies bias deltas at the strength, no alpha
        component = adapter.resolved.target.component
        for module, (b, a, c) in split_parts(adapter.resolved.target, up, down, bias).items():
            out[component][f"{component}.{module}.lora_A.weight"] = a.to(dtype)
            out[component][f"{component}.{module}.lora_B.weight"] = b.to(dtype)
            if c is not None:
                out[component][f"{component}.{module}.lora_B.bias"] = c.to(dtype)
    for component, parts in factored.items():  # an anchor: a zero pair that only registers the adapter with PEFT
        if not out[component]:
            module = f"{component}.{parts[0].module}"
            out[component][f"{module}.lora_A.weight"] = torch.zeros(1, parts[0].in_features, dtype=dtype)
            out[component][f"{module}.lora_B.weight"] = torch.zeros(parts[0].out_features, 1, dtype=dtype)
    for part in out.values():  # PEFT's lora_bias is per adapter: every module then needs a lora_B bias, zero if none
        if any(k.endswith(".bias") for k in part):
            for key in [k for k in part if k.endswith("lora_B.weight")]:
                part.setdefault(key.removesuffix("weight") + "bias", torch.zeros(part[key].shape[0], dtype=dtype))
    # A finite file can still overflow once alpha / rank is folded in (a crafted alpha of 1e300): check the result.
    bad = bad or [k for part in out.values() for k, v in part.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise LoraError(
            f"{report.name} has NaN or infinite values in {len(bad)} tensors (e.g. {bad[0]}): the training "
            "diverged or the file is damaged; use another checkpoint of it"
        )
    logger.info(
        "LoRA %s: %s, %d modules, rank %s, scale %s",
        report.name,
        report.format,
        report.targets,
        report.rank,
        report.scale,
    )
    return ConvertedLora(out["transformer"], out["text_encoder"], report, factored)


def _factored_parts(adapter: Adapter, tensors: Mapping[str, torch.Tensor], scale: float) -> list[FactoredPart]:
    """A LoKr/LoHa module as parts per diffusers module: each the whole factors plus the rows that are its own."""
    target = adapter.resolved.target
    roles = {role: tensors[key] for role, key in adapter.keys.items() if role not in ("alpha", "diff_b")}
    out, inp = target.shape
    if target.swap_halves:  # diffusers' rows are BFL's halves swapped
        return [FactoredPart(target.parts[0][0], adapter.kind, roles, scale, ((out // 2, out), (0, out // 2)), inp)]
    parts, start = [], 0
    for module, rows in target.parts:
        parts.append(FactoredPart(module, adapter.kind, roles, scale, ((start, start + rows),), inp))
        start += rows
    return parts


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t
