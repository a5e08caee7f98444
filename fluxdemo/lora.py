"""LoRA files: read (safetensors only, header validated first), inspect, convert exactly to diffusers' PEFT keys,
discover in a folder, and accept uploads.

Nothing here unpickles: `.ckpt/.pt/.bin` files are listed as refused and never opened, and a pickle renamed
`.safetensors` is caught by its first bytes. Inspection reads only the header (shapes) plus the few scalars it needs
(alphas; T5 and full-delta tensors, to tell a harmless all-zero part from a real one). Conversion is our own and
width-agnostic (diffusers' kohya and BFL converters hard-code width 3072 and 19/38 blocks): the per-module scale is
folded into lora_B, so the result loads with adapter weight = strength and means W + strength * B @ A exactly.
Per-format key parsing lives in fluxdemo.lora_formats.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath

import torch

from fluxdemo.config import PACKAGE_CONFIGS
from fluxdemo.errors import LoraError
from fluxdemo.flux_names import FluxDims
from fluxdemo.lora_formats import REFUSED_KINDS, Adapter, ModelTables, delta_shape, factors, group_keys, split_parts

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a LoRA header is a few hundred KB
MAX_UPLOAD_BYTES = 2 * 2**30  # a rank-128 LoRA on every FLUX.1 linear is about 1.2 GB in bf16
# LoKr/LoHa become an exact (B, A) pair whose rank can reach in_features (a full-rank LoKr is a dense delta); above
# this many float32 bytes in all we refuse rather than hold several GB of factors per adapter.
LYCORIS_MAX_BYTES = 2**30
REFUSED_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_TORCH_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
_PICKLE = (
    "a pickle/PyTorch checkpoint, not safetensors; it was not opened, because unpickling can run code. Get the "
    ".safetensors release of this LoRA, or convert it where you trust the file (torch.load, then "
    "safetensors.torch.save_file)"
)
_FOREIGN_MAGIC = (  # first bytes -> what the file really is
    (b"PK\x03\x04", _PICKLE),
    (b"\x80", _PICKLE),
    (b"GGUF", "a GGUF model file, not a LoRA"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself; fetch it with `git lfs pull`"),
    (b"<", "an HTML/XML page (a failed or login-gated download?), not safetensors; download the file again"),
)
_CONTROL_INPUTS = {128: "a FLUX.1 Canny/Depth control LoRA", 384: "a FLUX.1 Fill LoRA"}
_SD_CONTEXT = {2048: "SDXL", 1024: "SD2.x", 768: "SD1.5"}  # cross-attention to_k input width -> base model
_META_KEYS = ("modelspec.architecture", "modelspec.title", "modelspec.trigger_phrase", "modelspec.resolution",
              "ss_base_model_version", "ss_sd_model_name", "ss_network_module", "ss_network_dim", "ss_network_alpha",
              "ss_network_args", "ss_resolution", "ss_max_train_steps", "ss_steps", "ss_epoch",
              "ss_num_train_images", "ss_output_name", "ss_training_comment")  # fmt: skip
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default: what diffusers uses when lora_adapter_metadata omits lora_alpha


# --- reading ----------------------------------------------------------------------------------------------------


def _bad(path: Path, what: str) -> LoraError:
    return LoraError(f"{path.name} is not a usable safetensors file: {what}.")


def read_safetensors_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> dict:
    """The validated header {tensor: {dtype, shape, data_offsets}, "__metadata__": {...}}; reads no tensor data.

    Checks everything safetensors' own loader would, but with a message a person can act on; never unpickles.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(32)
        n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if not (len(head) > 8 and head[8:9] == b"{" and 2 <= n <= size - 8):
            for magic, what in _FOREIGN_MAGIC:
                if head.startswith(magic):
                    raise LoraError(f"{path.name} is {what}.")
            if size < 8:
                raise _bad(path, f"only {size} bytes, less than the 8-byte header length (truncated or empty)")
            if n > size - 8:
                raise _bad(path, f"its header claims {n} bytes but the file has {size} (truncated); download it again")
            raise _bad(path, "it does not start with a safetensors header")
        if n > max_header_bytes:
            raise _bad(path, f"its header is {n} bytes, over the {max_header_bytes}-byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(path, f"its header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "its __metadata__ is not a map of strings")
    _check_layout(path, {k: v for k, v in header.items() if k != "__metadata__"}, size - 8 - n)
    return header


def _check_layout(path: Path, tensors: dict, data_len: int) -> None:
    spans = []
    for name, info in tensors.items():
        if not isinstance(info, dict) or info.get("dtype") not in DTYPE_BYTES:
            raise _bad(path, f"tensor {name!r} has an unknown dtype {info.get('dtype') if isinstance(info, dict) else info!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        ok = isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
        if not ok or not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _bad(path, f"tensor {name!r} has a malformed shape or data_offsets")
        begin, end = offsets
        want = math.prod(shape) * DTYPE_BYTES[info["dtype"]]
        if not 0 <= begin <= end or end - begin != want:
            raise _bad(path, f"its header lies about sizes: {name!r} is {info['dtype']} {shape} = {want} bytes, but its "
                       f"data_offsets {offsets} span {end - begin}")  # fmt: skip
        if end > data_len:
            raise _bad(path, f"tensor {name!r} ends at byte {end} of a {data_len}-byte data section (truncated file); "
                       "download it again")  # fmt: skip
        spans.append((begin, end, name))
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps" if begin < position else "leaves a gap after"
            raise _bad(path, f"tensor {name!r} {what} {previous!r} in the data section (corrupt header)")
        position, previous = end, name
    if position != data_len:
        raise _bad(path, f"{data_len - position} bytes follow the last tensor (corrupt or not a safetensors file)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=1)
def flux_dev_dims() -> FluxDims:
    """The real FLUX.1-dev transformer's sizes, from the config shipped in the package."""
    return FluxDims.from_config(json.loads((PACKAGE_CONFIGS / "transformer" / "config.json").read_text()))


@lru_cache(maxsize=1)
def _flux_dev_clip() -> dict:
    return json.loads((PACKAGE_CONFIGS / "text_encoder" / "config.json").read_text())


# --- the report ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraReport:
    """What a LoRA file is, what it adapts, and whether (and why not) it fits the model. JSON-able via to_dict()."""

    name: str
    format: str  # peft | kohya | comfyui | bfl | fal-kontext | xlabs | lycoris-lokr | lycoris-loha | dora | ...
    naming: str  # the key spelling (the format, unless the format is an adapter kind such as LoKr)
    rank: int | dict[str, int] | None  # one rank, or {rank: number of modules}
    alpha: float | dict[str, int] | None  # None: no alpha stored (scale 1)
    scale: float | dict[str, int] | None  # alpha / rank as applied, folded into lora_B by to_diffusers
    targets: int  # base-model modules adapted (diffusers modules: a fused qkv counts 3)
    modules: dict[str, int]  # double_blocks / single_blocks / embedders / final_layer / clip / t5 -> count
    text_encoder: bool  # adapts CLIP-L
    t5: bool  # has T5 keys (applied never; refused unless all zero)
    base_model_hint: str
    compatible: bool
    problems: list[str]
    warnings: list[str]
    trigger_words: list[str]
    metadata: dict[str, str]
    matched: list[str]
    unmatched: list[str]
    sha256: str
    size: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def format_report(r: LoraReport) -> str:
    """The report as a few lines for a terminal."""
    verdict = "compatible" if r.compatible else "NOT compatible"
    lines = [f"{r.name}: {r.format} ({r.naming} naming), {verdict}", f"  rank {r.rank}, alpha {r.alpha}, scale {r.scale}"]
    lines.append(f"  adapts {r.targets} modules: " + ", ".join(f"{k} {v}" for k, v in r.modules.items()))
    lines.append(f"  base model: {r.base_model_hint or 'unknown'}; trigger words: {', '.join(r.trigger_words) or '-'}")
    lines.append(f"  keys: {len(r.matched)} matched, {len(r.unmatched)} unmatched" + (
        f" (e.g. {', '.join(r.unmatched[:3])})" if r.unmatched else ""))  # fmt: skip
    lines += [f"  problem: {p}" for p in r.problems] + [f"  warning: {w}" for w in r.warnings]
    return "\n".join(lines)


def _summary(values: list) -> int | float | dict[str, int] | None:
    counts = Counter(values)
    if not counts or set(counts) == {None}:
        return None
    return values[0] if len(counts) == 1 else {str(v): n for v, n in counts.most_common()}


def _trigger_words(meta: Mapping[str, str]) -> list[str]:
    if meta.get("modelspec.trigger_phrase"):
        return [w.strip() for w in meta["modelspec.trigger_phrase"].split(",") if w.strip()]
    try:  # kohya: {dataset folder: {caption tag: count}}; the most frequent tags carry the trigger
        folders = json.loads(meta.get("ss_tag_frequency") or "{}")
        counts = sum((Counter({str(t): int(n) for t, n in tags.items()}) for tags in folders.values()), Counter())
    except (ValueError, TypeError, AttributeError):
        return []
    return [tag.strip() for tag, _ in counts.most_common(5)]


def _peft_alpha(meta: Mapping[str, str], component: str, module: str) -> tuple[float, bool] | None:
    """(lora_alpha, use_rslora) from diffusers' lora_adapter_metadata for one module, or None without metadata."""
    try:
        config = json.loads(meta.get("lora_adapter_metadata") or "null")
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    # Pipeline-level saves prefix every field with the component ("transformer.lora_alpha"); model-level ones do not.
    scoped = {k.removeprefix(f"{component}."): v for k, v in config.items() if k.startswith(f"{component}.")}
    config = scoped or config
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    for pattern, value in (config.get("alpha_pattern") or {}).items():  # PEFT's own matching rule
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            alpha = value
    return float(alpha), bool(config.get("use_rslora"))


# --- analysis (shared by inspect_lora and to_diffusers) -------------------------------------------------------


@dataclass
class _Analysis:
    report: LoraReport
    plan: list[tuple[Adapter, float]] = field(default_factory=list)  # adapters to convert, with their scale


def _model_label(dims: FluxDims) -> str:
    return "FLUX.1-dev" if dims == flux_dev_dims() else f"this model (width {dims.inner})"


def _other_model(adapters: list[Adapter], shapes: Mapping[str, tuple]) -> tuple[str, str] | None:
    """(format, message) when the keys say the file is for another model family."""
    families = Counter(a.resolved.family for a in adapters)
    if families["sd3"] > families["flux"]:
        return "sd3", "an SD3 LoRA (joint_blocks), not FLUX: it adapts a transformer FLUX.1-dev does not have"
    if families["sd"] + families["sdxl-te2"] <= families["flux"]:
        return None
    version = "SDXL" if families["sdxl-te2"] else "SD1.x/SDXL"
    for a in adapters:
        if re.search(r"attn2[._]to_k$", a.module) and "down" in a.keys:
            version = _SD_CONTEXT.get(shapes[a.keys["down"]][1], version)
            break
    example = next(a for a in adapters if a.resolved.family in ("sd", "sdxl-te2"))
    naming = "kohya" if example.module.startswith("lora_") else "diffusers"
    return version.lower().replace(".", "").replace("/", "-"), (
        f"an {version} LoRA ({naming} naming: {example.module}), not FLUX: it adapts a UNet FLUX.1-dev does not have"
    )


def _is_noop(a: Adapter, read: Callable[[str], torch.Tensor]) -> bool:
    """True when the part has no effect: a LoRA with an all-zero half, or all-zero full deltas."""
    tensors = [read(k) for r, k in a.keys.items() if r != "alpha"]
    zero = [not bool(t.any()) for t in tensors]
    return any(zero) if a.kind == "lora" else all(zero)


def _analyse(
    shapes: Mapping[str, tuple],
    dtypes: Mapping[str, str],
    meta: Mapping[str, str],
    read: Callable[[str], torch.Tensor],
    dims: FluxDims,
    clip_config: Mapping,
    identity: tuple[str, str, int],
) -> _Analysis:
    tables = ModelTables(dims, clip_config)
    adapters, loose = group_keys(sorted(shapes), tables)
    model, problems, warnings = _model_label(dims), [], []
    matched, unmatched, misfits, unknown, refused, t5_live = [], list(loose), [], [], Counter(), 0
    plan, ranks, alphas, scales, groups, owners = [], [], [], [], Counter(), {}
    lycoris_bytes, t5_any = 0, False
    for a in adapters:
        keys, target, kind = list(a.keys.values()), a.resolved.target, a.kind
        if kind in REFUSED_KINDS or kind in ("mixed", "alpha-only"):
            if kind in REFUSED_KINDS and _is_noop(a, read):  # e.g. all-zero `diff` norms some trainers save
                matched += keys
                warnings.append(f"{a.module}: all-zero {kind} weights, ignored (they have no effect)")
            else:
                refused[REFUSED_KINDS.get(kind, f"{kind} keys that form no adapter")] += 1
                unmatched += keys
            continue
        if target is None:
            unknown.append(a)
            unmatched += keys
            continue
        try:
            (out, inp), rank, exact_rank = delta_shape(a, shapes)
        except ValueError as e:
            problems.append(f"{a.module} {e}")
            unmatched += keys
            continue
        if target.shape is not None and (out, inp) != target.shape:
            misfits.append((a, out, inp))
            unmatched += keys
            continue
        if any(dtypes[k] not in FLOAT_DTYPES for r, k in a.keys.items() if r != "alpha"):
            problems.append(f"{a.module} has non-floating-point weights ({', '.join(sorted(set(dtypes.values())))})")
            unmatched += keys
            continue
        matched += keys
        if target.component == "t5":
            t5_any = True
            if not _is_noop(a, read):
                t5_live += 1
            continue
        alpha = float(read(a.keys["alpha"]).float().reshape(-1)[0]) if "alpha" in a.keys else None
        rslora = False
        if alpha is None and a.resolved.naming not in ("xlabs",) and kind == "lora":
            alpha, rslora = _peft_alpha(meta, target.component, target.name) or (None, False)
        if alpha is not None and not math.isfinite(alpha):
            problems.append(f"{a.module}: its alpha is {alpha}")
        # LoKr with both factors full (rank 0 here) has no alpha scaling in LyCORIS; a missing alpha means alpha = rank.
        scale = 1.0 if alpha is None or rank == 0 else alpha / (math.sqrt(rank) if rslora else rank)
        if kind in ("lokr", "loha"):
            lycoris_bytes += 4 * exact_rank * (out + inp)
        for part, _ in target.parts:
            if part in owners:
                problems.append(f"{part} is adapted twice, by {owners[part]} and {a.module}")
            owners[part] = a.module
            groups[target.group] += 1
        plan.append((a, scale))
        ranks.append(rank)
        alphas.append(alpha)
        scales.append(scale)

    headline = _other_model(adapters, shapes)
    fmt = headline[0] if headline else None
    control = next(((f"{_CONTROL_INPUTS[inp]} (img_in takes {inp} input channels, {model} {dims.in_channels}): it "
                     "needs the control model, not FLUX.1-dev") for a, _, inp in misfits
                    if a.resolved.target.name in ("img_in", "x_embedder") and inp in _CONTROL_INPUTS), None)  # fmt: skip
    widths = Counter(inp for a, _, inp in misfits if a.resolved.target.shape[1] == dims.inner)
    if headline:
        problems.insert(0, headline[1])
    elif not adapters:
        fmt = "none"
        problems.insert(0, f"no LoRA weights in this file ({len(shapes)} tensors, none named like a LoRA"
                        + (f", e.g. {loose[0]!r})" if loose else ")"))  # fmt: skip
    elif control:
        fmt = "bfl-control"
        problems.insert(0, control)
    elif widths and widths.most_common(1)[0][0] != dims.inner:
        width = widths.most_common(1)[0][0]
        problems.insert(0, f"made for a model of width {width}, but {model} has width {dims.inner} "
                        f"({len(misfits)} modules do not fit)")  # fmt: skip
    else:
        if not plan and not t5_any and unknown:
            problems.insert(0, f"none of its {len(adapters)} LoRA modules exist in {model} (e.g. {unknown[0].module}): "
                            "a LoRA for another model")  # fmt: skip
        elif unknown:
            notes = [a.resolved.note or a.module for a in unknown]
            problems.append(f"{len(unknown)} LoRA modules match nothing in {model}: {'; '.join(notes[:3])}")
        for a, out, inp in misfits[:3]:
            problems.append(f"{a.module}: its delta is {out}x{inp}, but {a.resolved.target.name} is "
                            f"{a.resolved.target.shape[0]}x{a.resolved.target.shape[1]}")  # fmt: skip
        if loose:
            problems.append(f"{len(loose)} tensors are not LoRA weights (e.g. {loose[0]!r}); full weights cannot be "
                            "applied as an adapter")  # fmt: skip
    problems += [f"{reason} ({n} modules)" for reason, n in refused.items()]
    if t5_live:
        problems.append(f"it also adapts the T5 text encoder ({t5_live} modules); applying a LoRA to the quantized T5 "
                        "is not supported, and without that part the result would not be what was trained")  # fmt: skip
    elif t5_any:
        warnings.append("its T5 part is all zeros (no effect) and is ignored")
    if lycoris_bytes > LYCORIS_MAX_BYTES:
        problems.append(f"its LyCORIS modules need {lycoris_bytes / 2**30:.1f} GB as exact LoRA factors (the limit is "
                        f"{LYCORIS_MAX_BYTES / 2**30:.0f} GB): a near-full-rank LoKr/LoHa is not supported; use a LoRA "
                        "release of it")  # fmt: skip

    namings = Counter(a.resolved.naming for a in adapters if a.resolved.family in ("flux", "clip", "t5"))
    naming = namings.most_common(1)[0][0] if namings else "unknown"
    kinds = Counter(a.kind for a in adapters)
    if fmt is None:
        fmt = next((f for k, f in (("lokr", "lycoris-lokr"), ("loha", "lycoris-loha"), ("dora", "dora")) if kinds[k]),
                   "full-delta" if set(kinds) == {"full"} else naming)  # fmt: skip
    selected = {k: meta[k][:300] for k in _META_KEYS if k in meta}
    hint = next((meta[k] for k in ("modelspec.architecture", "ss_base_model_version", "ss_sd_model_name") if meta.get(k)),
                "FLUX.1 (from its key names)" if plan else "")  # fmt: skip
    if "schnell" in hint.lower():
        warnings.append(f"trained on FLUX.1-schnell ({hint}): it loads on FLUX.1-dev, but was made for 1-4 step "
                        "sampling, so expect a different strength")  # fmt: skip
    elif plan and hint and not any(w in hint.lower() for w in ("flux", "from its key names")):
        warnings.append(f"its metadata names {hint!r} as the base model, but its keys are FLUX.1's")
    name, sha256, size = identity
    modules = dict(sorted(groups.items()))
    if t5_any:
        modules["t5"] = sum(1 for a in adapters if a.resolved.family == "t5" and a.resolved.target)
    report = LoraReport(
        name=name, format=fmt, naming=naming, rank=_summary(ranks), alpha=_summary(alphas), scale=_summary(scales),
        targets=sum(modules.values()), modules=modules, text_encoder=bool(groups["clip"]), t5=t5_any,
        base_model_hint=hint, compatible=not problems, problems=problems, warnings=warnings,
        trigger_words=_trigger_words(meta), metadata=selected, matched=sorted(matched), unmatched=sorted(unmatched),
        sha256=sha256, size=size,
    )  # fmt: skip
    return _Analysis(report, plan)


# --- public entry points ------------------------------------------------------------------------------------------


def inspect_lora(path: Path, dims: FluxDims | None = None, *, clip_config: Mapping | None = None) -> LoraReport:
    """The report for one file, from its header plus the few scalars inspection needs; raises LoraError if unreadable."""
    path = Path(path)
    header = read_safetensors_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    identity = (path.name, file_sha256(path), path.stat().st_size)
    with _open(path) as f:
        return _analyse(
            {k: tuple(v["shape"]) for k, v in tensors.items()}, {k: v["dtype"] for k, v in tensors.items()},
            header.get("__metadata__", {}), f.get_tensor, dims or flux_dev_dims(), clip_config or _flux_dev_clip(),
            identity,
        ).report  # fmt: skip


@dataclass(frozen=True)
class ConvertedLora:
    """PEFT-style diffusers keys with the scale folded into lora_B: load with adapter weight = strength.

    transformer: "transformer.<module>.lora_A.weight" / ".lora_B.weight"; text_encoder: "text_encoder.<module>...".
    The parts of a fused BFL linear share one lora_A tensor (copy before saving them with safetensors).
    """

    transformer: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    report: LoraReport


def to_diffusers(
    path_or_tensors: Path | str | Mapping[str, torch.Tensor],
    dims: FluxDims,
    clip_config: Mapping | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> ConvertedLora:
    """Convert any supported LoRA exactly (W + strength * B @ A per module); raises LoraError with the problems.

    dtype: of the result; default the file's own (the factors are computed in float32 either way).
    """
    if isinstance(path_or_tensors, Mapping):
        t = dict(path_or_tensors)
        identity = ("<tensors>", "", sum(v.numel() * v.element_size() for v in t.values()))
        dtypes = {k: _TORCH_DTYPES.get(v.dtype, str(v.dtype)) for k, v in t.items()}
        return _convert(t.__getitem__, {k: tuple(v.shape) for k, v in t.items()}, dtypes, metadata or {}, dims,
                        clip_config, identity, dtype)  # fmt: skip
    path = Path(path_or_tensors)
    header = read_safetensors_header(path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    with _open(path) as f:
        return _convert(f.get_tensor, {k: tuple(v["shape"]) for k, v in tensors.items()},
                        {k: v["dtype"] for k, v in tensors.items()}, header.get("__metadata__", {}), dims,
                        clip_config, (path.name, file_sha256(path), path.stat().st_size), dtype)  # fmt: skip


def _convert(read, shapes, dtypes, meta, dims, clip_config, identity, dtype) -> ConvertedLora:
    cache: dict[str, torch.Tensor] = {}

    def cached(key: str) -> torch.Tensor:
        if key not in cache:
            cache[key] = read(key)
        return cache[key]

    analysis = _analyse(shapes, dtypes, meta, cached, dims, clip_config or _flux_dev_clip(), identity)
    report = analysis.report
    if not report.compatible:
        raise LoraError(f"{report.name} cannot be applied to {_model_label(dims)}: " + "; ".join(report.problems))
    out: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "text_encoder": {}}
    bad = []
    for adapter, scale in analysis.plan:
        tensors = {k: cached(k) for r, k in adapter.keys.items() if r != "alpha"}
        bad += [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
        up, down = factors(adapter, tensors, scale)
        result_dtype = dtype or tensors[adapter.keys.get("up", next(iter(tensors)))].dtype
        component = adapter.resolved.target.component
        for module, (b, a) in split_parts(adapter.resolved.target, up, down).items():
            out[component][f"{component}.{module}.lora_A.weight"] = a.to(result_dtype)
            out[component][f"{component}.{module}.lora_B.weight"] = b.to(result_dtype)
    if bad:
        raise LoraError(f"{report.name} has NaN or infinite values in {len(bad)} tensors (e.g. {bad[0]}): the training "
                        "diverged or the file is damaged; use another checkpoint of it")  # fmt: skip
    logger.info("LoRA %s: %s, %d modules, rank %s, scale %s", report.name, report.format, report.targets,
                report.rank, report.scale)  # fmt: skip
    return ConvertedLora(out["transformer"], out["text_encoder"], report)


class _open:
    """safetensors.safe_open with its errors as LoraError (our header check runs first, so these are rare)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self):
        from safetensors import safe_open

        try:
            self.handle = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError for anything it dislikes
            raise _bad(self.path, str(e)) from None
        return self.handle.__enter__()

    def __exit__(self, *exc) -> None:
        self.handle.__exit__(*exc)


# --- discovery --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraEntry:
    """One file in the LoRA folder: inspected (report), or refused without being opened / unreadable (refused)."""

    name: str  # path relative to the folder, posix
    path: Path
    size: int
    mtime_ns: int
    sha256: str | None = None
    report: LoraReport | None = None
    refused: str | None = None

    @property
    def usable(self) -> bool:
        return self.report is not None and self.report.compatible

    def to_dict(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "usable": self.usable,
                "refused": self.refused, "report": self.report.to_dict() if self.report else None}  # fmt: skip


class LoraLibrary:
    """The LoRA folder, scanned recursively; entries are cached by (size, mtime) and re-inspected only on change."""

    def __init__(self, folder: Path, dims: FluxDims | None = None, clip_config: Mapping | None = None) -> None:
        self.folder = Path(folder)
        self.dims = dims or flux_dev_dims()
        self.clip_config = clip_config
        self._index: dict[str, LoraEntry] = {}
        self._lock = threading.Lock()

    @property
    def entries(self) -> list[LoraEntry]:
        return [self._index[n] for n in sorted(self._index)]

    def refresh(self) -> list[LoraEntry]:
        with self._lock:
            root = self.folder.resolve()
            found: dict[str, LoraEntry] = {}
            # followlinks=False: a linked folder could lead anywhere; linked files are checked one by one below.
            for dirpath, dirnames, filenames in os.walk(root) if root.is_dir() else ():
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(f for f in filenames if not f.startswith(".")):  # .upload-*.tmp, caches
                    path = Path(dirpath) / filename
                    if path.suffix.lower() != ".safetensors" and path.suffix.lower() not in REFUSED_SUFFIXES:
                        continue
                    name = path.relative_to(root).as_posix()
                    try:
                        st = path.stat()
                    except OSError:  # a dangling link
                        continue
                    old = self._index.get(name)
                    same = old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns)
                    found[name] = old if same else self._scan(root, path, name, st)
            self._index = found
            usable = sum(e.usable for e in found.values())
            logger.info("LoRA folder %s: %d files, %d usable", self.folder, len(found), usable)
            return self.entries

    def _scan(self, root: Path, path: Path, name: str, st: os.stat_result) -> LoraEntry:
        entry = LoraEntry(name, path, st.st_size, st.st_mtime_ns)
        if not path.resolve().is_relative_to(root):
            return dataclasses.replace(entry, refused="a link leading outside the LoRA folder; not opened")
        if path.suffix.lower() in REFUSED_SUFFIXES:
            return dataclasses.replace(entry, refused=f"{path.suffix} files are pickles, which can run code when "
                                       "loaded; never opened. Use the .safetensors release of this LoRA")  # fmt: skip
        try:
            report = inspect_lora(path, self.dims, clip_config=self.clip_config)
        except (LoraError, OSError) as e:
            return dataclasses.replace(entry, refused=str(e))
        return dataclasses.replace(entry, sha256=report.sha256, report=report)

    def get(self, name: str) -> LoraEntry:
        """The entry for a name relative to the folder; unsafe or unknown names raise LoraError before any file opens."""
        pure = PurePosixPath(name)
        if not name or "\\" in name or "\x00" in name or pure.is_absolute() or ".." in pure.parts:
            raise LoraError(f"{name!r} is not a LoRA name: give a path inside the LoRA folder {self.folder}.")
        key = pure.as_posix()
        if key not in self._index:
            self.refresh()
        entry = self._index.get(key)
        if entry is None:
            names = ", ".join(e.name for e in self.entries if e.usable)[:500] or "none"
            raise LoraError(f"No LoRA named {name!r} in {self.folder}; available: {names}.")
        if not entry.path.resolve().is_relative_to(self.folder.resolve()):
            raise LoraError(f"{name!r} is a link leading outside the LoRA folder {self.folder}; it is not opened.")
        if entry.refused:
            raise LoraError(f"{name}: {entry.refused}")
        return entry


# --- upload ---------------------------------------------------------------------------------------------------------

_UPLOAD_LOCK = threading.Lock()  # picking a free name and renaming onto it must not interleave


def _sanitise(original_name: str) -> str:
    base = re.split(r"[\\/]", original_name)[-1]
    stem = base[: -len(".safetensors")] if base.lower().endswith(".safetensors") else base.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:80] or "lora"


def save_upload(src: Path, folder: Path, original_name: str, max_bytes: int = MAX_UPLOAD_BYTES) -> Path:
    """Store an uploaded LoRA in `folder` under a safe unique name; returns its path (an identical file is reused).

    The size is checked first and the header validated before any tensor byte is copied; the copy is validated
    again (what we keep is what we checked) and moved into place atomically.
    """
    src, folder = Path(src), Path(folder)
    size = src.stat().st_size
    if size > max_bytes:
        raise LoraError(f"{original_name} is {size / 1e6:.1f} MB; uploads are limited to {max_bytes / 1e6:.0f} MB.")
    read_safetensors_header(src)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            while chunk := inp.read(1 << 22):
                digest.update(chunk)
                out.write(chunk)
                if out.tell() > max_bytes:
                    raise LoraError(f"{original_name} grew past {max_bytes / 1e6:.0f} MB while being copied.")
            out.flush()
            os.fsync(out.fileno())
        read_safetensors_header(tmp)
        with _UPLOAD_LOCK:
            dest = _free_name(folder, _sanitise(original_name), digest.hexdigest(), tmp.stat().st_size)
            if dest.exists():
                tmp.unlink()
            else:
                os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("LoRA upload %s stored as %s", original_name, dest.name)
    return dest


def _free_name(folder: Path, stem: str, sha256: str, size: int) -> Path:
    """stem.safetensors, stem-1, stem-2, ... or stem-<hash>; an existing file with the same bytes is returned."""
    candidates = [f"{stem}.safetensors"] + [f"{stem}-{i}.safetensors" for i in range(1, 100)]
    for candidate in [*candidates, f"{stem}-{sha256[:12]}.safetensors"]:
        path = folder / candidate
        if not path.exists():
            return path
        if path.is_file() and path.stat().st_size == size and file_sha256(path) == sha256:
            return path
    raise LoraError(f"Too many uploads named {stem!r} in {folder}; rename the file and upload it again.")
