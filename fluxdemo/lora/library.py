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
import itertools
import json
import logging
import math
import os
import re
import stat
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

import torch

from fluxdemo.errors import CancelledError, HubError, LoraError
from fluxdemo.files import new_file_mode
from fluxdemo.lora.formats import Adapter, ModelTables, analyse_keys, factors, split_parts, split_role
from fluxdemo.lora.hub import HUB_LORA_QUOTA_BYTES, HubLoraRef, download_lora, mark_used, parse_hub_lora
from fluxdemo.lora.lycoris import FactoredPart
from fluxdemo.model.names import FluxDims
from fluxdemo.model.presets import PACKAGE_CONFIGS
from fluxdemo.untrusted import MAX_COUNTED_TAGS, MAX_FIELD_CHARS, MAX_TAG_FREQUENCY_CHARS, capped, names_list

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a LoRA header is a few hundred KB
MAX_UPLOAD_BYTES = 2 * 2**30  # a rank-128 LoRA on every FLUX.1 linear is about 1.2 GB in bf16
HUB_MEMO_ENTRIES = 64  # Hub LoRAs remembered by name (a visitor can name as many as they like)
# Quotas for what visitors can store: files per upload request, and the LoRA folder's file count and total size.
MAX_UPLOAD_FILES = 4
MAX_FOLDER_FILES = 200
MAX_FOLDER_BYTES = 50 * 2**30
REFUSED_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
DTYPE_BYTES = (
    dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 1)
    | dict.fromkeys(("I16", "U16", "F16", "BF16"), 2)
    | dict.fromkeys(("I32", "U32", "F32"), 4)
    | dict.fromkeys(("I64", "U64", "F64"), 8)
)
_TORCH_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"} | {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
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
# What the report shows of a file's metadata (kohya's ss_* keys, the modelspec standard).
_META_KEYS = tuple(
    "modelspec.architecture modelspec.title modelspec.trigger_phrase modelspec.resolution ss_base_model_version "  # noqa: SIM905
    "ss_sd_model_name ss_network_module ss_network_dim ss_network_alpha ss_network_args ss_resolution "
    "ss_max_train_steps ss_steps ss_epoch ss_num_train_images ss_output_name ss_training_comment".split()
)


# --- reading ----------------------------------------------------------------------------------------------------


def _bad(path: Path, what: str) -> LoraError:
    return LoraError(f"{path.name} is not a usable safetensors file: {what}.")


def _what_instead(head: bytes) -> str:
    """What a file that is not safetensors looks like from its first bytes: text (quoted) or unknown binary data."""
    text = head.decode("utf-8", errors="ignore")  # ignore: the 32 bytes may end mid-character
    if len(text) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"a text file (it begins {text[:24]!r})"
    return "binary data of an unknown kind"


def read_safetensors_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> dict:
    """The validated header {tensor: {dtype, shape, data_offsets}, "__metadata__": {...}}; reads no tensor data.

    Checks everything safetensors' own loader would, but with a message a person can act on; never unpickles.
    """
    path = Path(path)
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end; stat opens nothing
        raise LoraError(f"{path.name} is not a regular file (a pipe, device or folder); it was not opened.")
    size = st.st_size
    with path.open("rb") as f:
        head = f.read(32)
        n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if not (len(head) > 8 and head[8:9] == b"{" and 2 <= n <= size - 8):
            for magic, what in _FOREIGN_MAGIC:
                if head.startswith(magic):
                    raise LoraError(f"{path.name} is {what}.")
            if size < 8:
                raise _bad(path, f"only {size} bytes, less than the 8-byte header length (truncated or empty)")
            if n > max_header_bytes:  # no real header is that long: these bytes were never a safetensors file
                raise LoraError(f"{path.name} is {_what_instead(head)}, not a safetensors file at all.")
            if n > size - 8:
                raise _bad(path, f"its header claims {n} bytes but the file has {size} (truncated); download it again")
            raise _bad(path, "it does not start with a safetensors header")
        if n > max_header_bytes:
            raise _bad(path, f"its header is {n} bytes, over the {max_header_bytes}-byte limit")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: a crafted nesting bomb
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
            raise _bad(
                path, f"tensor {name!r} has an unknown dtype {info.get('dtype') if isinstance(info, dict) else info!r}"
            )
        shape, offsets = info.get("shape"), info.get("data_offsets")
        ok = isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
        if not ok or not (
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        ):
            raise _bad(path, f"tensor {name!r} has a malformed shape or data_offsets")
        begin, end = offsets
        want = math.prod(shape) * DTYPE_BYTES[info["dtype"]]
        if not 0 <= begin <= end or end - begin != want:
            raise _bad(
                path,
                f"its header lies about sizes: {name!r} is {info['dtype']} {shape} = {want} bytes, but its "
                f"data_offsets {offsets} span {end - begin}",
            )
        if end > data_len:
            raise _bad(
                path,
                f"tensor {name!r} ends at byte {end} of a {data_len}-byte data section (truncated file); "
                "download it again",
            )
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
        """The report as JSON-able data, every list and string capped (bounded): what any client is shown."""
        return bounded(dataclasses.asdict(self))


# What a report shows at most: a file can hold millions of keys or a megabyte-long trigger phrase, and every client
# (the studio, its API, report.json) gets the report; capped, a report stays well under 100 kB whatever the file.
REPORT_MAX_ITEMS = 50
REPORT_MAX_CHARS = 300
TRIGGER_MAX_WORDS = 12  # trigger words go into prompts, so they are cut at parse time, with no "and N more" marker
TRIGGER_MAX_CHARS = 80


def bounded(value, max_items: int = REPORT_MAX_ITEMS, max_chars: int = REPORT_MAX_CHARS):
    """`value` (JSON-like: dicts, lists, strings, numbers) with every list and dict cut to max_items entries (a last
    entry says "and 2,131 more") and every string to max_chars characters; for anything a LoRA file controls."""
    if isinstance(value, str):
        return (
            value
            if len(value) <= max_chars
            else f"{value[:max_chars]}... ({len(value) - max_chars:,} more characters)"
        )
    if isinstance(value, dict):
        items = list(value.items())
        out = {bounded(k, max_items, max_chars): bounded(v, max_items, max_chars) for k, v in items[:max_items]}
        if len(items) > max_items:
            out["..."] = f"and {len(items) - max_items:,} more"
        return out
    if isinstance(value, (list, tuple)):
        out = [bounded(v, max_items, max_chars) for v in value[:max_items]]
        return out + [f"and {len(value) - max_items:,} more"] if len(value) > max_items else out
    return value


# An absolute or home-relative path inside free text (kohya writes the trainer's own paths into ss_sd_model_name,
# ss_output_name and comments): at least two separators, not inside a word, a number such as 1024/768 or a URL.
_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:|~|\.{1,2})?(?:[\\/][^\\/\s\"'<>|,;]+){2,}[\\/]?")


def paths_to_file_names(text: str) -> str:
    """Every path in `text` reduced to its file name ("/home/me/models/x.safetensors" -> "x.safetensors");
    URLs stay: they name a public page, not the trainer's disk."""
    return _PATH.sub(lambda m: re.split(r"[\\/]", m[0].rstrip("\\/"))[-1], text)


def format_report(r: LoraReport) -> str:
    """The report as a few lines for a terminal."""
    verdict = "compatible" if r.compatible else "NOT compatible"
    lines = [
        f"{r.name}: {r.format} ({r.naming} naming), {verdict}",
        f"  rank {r.rank}, alpha {r.alpha}, scale {r.scale}",
    ]
    lines.append(f"  adapts {r.targets} modules: " + ", ".join(f"{k} {v}" for k, v in r.modules.items()))
    lines.append(f"  base model: {r.base_model_hint or 'unknown'}; trigger words: {', '.join(r.trigger_words) or '-'}")
    lines.append(
        f"  keys: {len(r.matched)} matched, {len(r.unmatched)} unmatched"
        + (f" (e.g. {names_list(r.unmatched, 3)})" if r.unmatched else "")
    )
    lines += [f"  problem: {p}" for p in r.problems] + [f"  warning: {w}" for w in r.warnings]
    return "\n".join(lines)


def _summary(values: list) -> int | float | dict[str, int] | None:
    counts = Counter(values)
    if not counts or set(counts) == {None}:
        return None
    return values[0] if len(counts) == 1 else {str(v): n for v, n in counts.most_common()}


def _trigger_words(meta: Mapping[str, str]) -> list[str]:
    """At most TRIGGER_MAX_WORDS words of at most TRIGGER_MAX_CHARS each; only the phrase's start is parsed."""
    words = _parse_trigger_words(meta)
    return [w[:TRIGGER_MAX_CHARS] for w in words[:TRIGGER_MAX_WORDS]]


def _parse_trigger_words(meta: Mapping[str, str]) -> list[str]:
    if meta.get("modelspec.trigger_phrase"):
        phrase = meta["modelspec.trigger_phrase"][: TRIGGER_MAX_WORDS * (TRIGGER_MAX_CHARS + 2)]
        return [w.strip() for w in phrase.split(",") if w.strip()]
    text = meta.get("ss_tag_frequency") or "{}"
    if len(text) > MAX_TAG_FREQUENCY_CHARS:  # far past any real one: no trigger words rather than a long parse
        return []
    counts: Counter[str] = Counter()  # one Counter updated in place: summing Counters copied one per folder
    try:  # kohya: {dataset folder: {caption tag: count}}; the most frequent tags carry the trigger
        pairs = (pair for tags in json.loads(text).values() for pair in tags.items())
        for tag, n in itertools.islice(pairs, MAX_COUNTED_TAGS):
            counts[str(tag)] += int(n)
    except (ValueError, TypeError, AttributeError, RecursionError, OverflowError):  # OverflowError: int(1e400)
        return []
    return [tag.strip() for tag, n in counts.most_common(5) if n > 0]  # as Counter sums kept them: positive only


def _model_label(dims: FluxDims) -> str:
    return "FLUX.1-dev" if dims == flux_dev_dims() else f"this model (width {dims.inner})"


# (sha256, name, dims, CLIP config) -> (report, plan): a file is inspected by the library, then converted when picked;
# the verdict depends only on its bytes and the model, so the second pass reuses the first.
_ANALYSES: OrderedDict[tuple, tuple] = OrderedDict()
_ANALYSES_KEPT = 8


def _analyse(shapes, dtypes, meta, read, dims, clip_config, identity: tuple[str, str, int]) -> tuple:
    """(report, plan): the key verdict of lora_formats plus what the metadata says."""
    key = (identity, dims, json.dumps(clip_config, sort_keys=True, default=str)) if identity[1] else None
    if key in _ANALYSES:
        _ANALYSES.move_to_end(key)
        return _ANALYSES[key]
    result = _analyse_uncached(shapes, dtypes, meta, read, dims, clip_config, identity)
    if key is not None:
        _ANALYSES[key] = result
        while len(_ANALYSES) > _ANALYSES_KEPT:
            _ANALYSES.popitem(last=False)
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
        metadata={key: paths_to_file_names(meta[key][:2000])[:REPORT_MAX_CHARS] for key in _META_KEYS if key in meta},
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
        raise _bad(path, str(e)) from None
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
    # LoKr/LoHa modules, kept factored (fluxdemo.lycoris.attach): component -> parts. Each component with parts also
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
            {k: _TORCH_DTYPES.get(v.dtype, "?") for k, v in t.items()},
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
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "usable": self.usable,
            "refused": self.refused,
            "report": self.report.to_dict() if self.report else None,
        }


@dataclass(frozen=True)
class HubLoras:
    """The operator's policy for LoRAs named by a Hub repo (app.py's flags, never a visitor's): LoraLibrary's hub
    arguments, carried as one value from the flags to the library."""

    enabled: bool = True
    max_bytes: int = MAX_UPLOAD_BYTES
    quota_bytes: int = HUB_LORA_QUOTA_BYTES
    token: str | None = None  # for LoRAs only; the operator's HF_TOKEN is never sent for a visitor's LoRA
    cache: Path | None = None  # default: hub_lora_cache_dir()
    endpoint: str | None = None  # default: HF_ENDPOINT

    def library_args(self) -> dict:
        return dict(hub=self.enabled, hub_max_bytes=self.max_bytes, hub_endpoint=self.endpoint, hub_cache=self.cache,
                    hub_quota_bytes=self.quota_bytes, hub_token=self.token)  # fmt: skip


class LoraLibrary:
    """The LoRA folder, scanned recursively; entries are cached by (size, mtime) and re-inspected only on change."""

    def __init__(
        self,
        folder: Path,
        dims: FluxDims | None = None,
        clip_config: Mapping | None = None,
        *,
        hub: bool = True,
        hub_max_bytes: int = MAX_UPLOAD_BYTES,
        hub_endpoint: str | None = None,
        hub_cache: Path | None = None,
        hub_quota_bytes: int = HUB_LORA_QUOTA_BYTES,
        hub_token: str | None = None,
    ) -> None:
        """`hub`: whether names of Hub repos are fetched at all (HF_HUB_OFFLINE aside); `hub_max_bytes`: one Hub
        LoRA's limit; `hub_cache` (default hub_lora_cache_dir()) and `hub_quota_bytes`: their own cache folder and its
        total; `hub_token`: a token for LoRAs only (None: none is sent; HF_TOKEN is the operator's, never used)."""
        self.folder = Path(folder)
        self.dims = dims or flux_dev_dims()
        self.clip_config = clip_config
        self.hub, self.hub_max_bytes, self.hub_endpoint, self.hub_cache = hub, hub_max_bytes, hub_endpoint, hub_cache
        self.hub_quota_bytes, self.hub_token = hub_quota_bytes, hub_token
        self._hub: OrderedDict[str, LoraEntry] = OrderedDict()  # name -> entry, least recently used first
        self._hub_lock = threading.Lock()
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
                    if not stat.S_ISREG(st.st_mode):  # a FIFO named *.safetensors would block the scan when opened
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
            return dataclasses.replace(
                entry,
                refused=f"{path.suffix} files are pickles, which can run code when "
                "loaded; never opened. Use the .safetensors release of this LoRA",
            )
        try:
            report = inspect_lora(path, self.dims, clip_config=self.clip_config)
        except (LoraError, OSError) as e:
            return dataclasses.replace(entry, refused=str(e))
        return dataclasses.replace(entry, sha256=report.sha256, report=report)

    def get(self, name: str) -> LoraEntry:
        """The entry for a name relative to the folder, or for a Hub reference (user/repo[/file.safetensors][@rev] or
        a huggingface.co URL) not found in the folder; unsafe or unknown names raise LoraError, opening nothing."""
        entry = self._local(name)
        if entry is None:
            ref = parse_hub_lora(name)
            if ref is not None:
                return self._from_hub(name, ref)
            names = names_list([e.name for e in self.entries if e.usable])
            raise LoraError(f"No LoRA named {capped(name, MAX_FIELD_CHARS)!r} in the LoRA folder "
                            f"{self.folder.name!r}; available: {names}.")  # fmt: skip
        if not entry.path.resolve().is_relative_to(self.folder.resolve()):
            raise LoraError(f"{name!r} is a link leading outside the LoRA folder {self.folder.name!r}; not opened.")
        if entry.refused:
            raise LoraError(f"{name}: {entry.refused}")
        return entry

    def _local(self, name: str) -> LoraEntry | None:
        """The folder's entry for a name, rescanning when it is new or changed; LoraError for an unsafe name."""
        pure = PurePosixPath(name)
        if not name or "\\" in name or "\x00" in name or pure.is_absolute() or ".." in pure.parts:
            raise LoraError(f"{capped(name, MAX_FIELD_CHARS)!r} is not a LoRA name: give a path inside the LoRA "
                            f"folder {self.folder.name!r}.")  # fmt: skip
        key = pure.as_posix()
        if key not in self._index or _changed(self._index[key]):  # new, edited or deleted since the last scan
            self.refresh()
        return self._index.get(key)

    def is_hub_name(self, name: str, scan: bool = True) -> bool:
        """Whether get(name) goes to the Hub: a Hub reference that names no file in the LoRA folder. No network,
        so a caller can fetch Hub LoRAs (prefetch) before it queues the GPU work that uses them; with scan=False
        not even the disk (the folder as last scanned), for callers in the server's event loop."""
        if not scan:
            return PurePosixPath(name).as_posix() not in self._index and parse_hub_lora(name) is not None
        try:
            return self._local(name) is None and parse_hub_lora(name) is not None
        except LoraError:
            return False

    def fetched(self, name: str) -> bool:
        """Whether a Hub name is downloaded and inspected already (prefetch), so get() needs no network."""
        with self._hub_lock:
            return _memo_key(name) in self._hub

    def prefetch(self, names: Iterable[str], cancelled: Callable[[], bool] | None = None) -> list[LoraEntry]:
        """Download and inspect the Hub LoRAs among `names` (folder names are skipped), so that get() later finds
        them without network; `cancelled` is asked between files and between chunks (CancelledError)."""
        entries = []
        for name in names:
            if cancelled is not None and cancelled():
                raise CancelledError("Cancelled while getting LoRAs from the Hub.")
            if self.is_hub_name(name):
                entries.append(self._from_hub(name, parse_hub_lora(name), cancelled))
        return entries

    def _from_hub(self, name: str, ref: HubLoraRef, cancelled: Callable[[], bool] | None = None) -> LoraEntry:
        if not self.hub:
            raise LoraError(f"LoRAs from the Hub are turned off on this app; put the .safetensors file of "
                            f"{capped(name, MAX_FIELD_CHARS)} in the LoRA folder (or upload it) instead.")  # fmt: skip
        key = _memo_key(name)
        with self._hub_lock:
            cached = self._hub.get(key)
            if cached is not None and not _changed(cached):
                self._hub.move_to_end(key)
                mark_used(cached.path)
                return cached if cached.name == name else dataclasses.replace(cached, name=name)  # as spelt here
        try:
            got = download_lora(ref, _has_lora_keys, self.hub_max_bytes, token=self.hub_token,
                                cache_dir=self.hub_cache, endpoint=self.hub_endpoint,
                                quota_bytes=self.hub_quota_bytes, cancelled=cancelled)  # fmt: skip
        except HubError as e:
            raise LoraError(str(e)) from None
        try:
            report = inspect_lora(got.path, self.dims, clip_config=self.clip_config)
        except LoraError:
            got.path.unlink(missing_ok=True)  # a file that fails inspection must not fill the cache
            raise
        # The file's own trigger words win; many Hub LoRAs carry theirs only in the model card (instance_prompt).
        report = dataclasses.replace(
            report,
            name=str(dataclasses.replace(got.ref, revision=ref.revision)),
            trigger_words=report.trigger_words or got.trigger_words,
            # what every client is shown anyway: a file with a million keys made each memo entry 90 MiB
            matched=bounded(report.matched, REPORT_MAX_ITEMS - 1),
            unmatched=bounded(report.unmatched, REPORT_MAX_ITEMS - 1),
        )
        st = got.path.stat()
        entry = LoraEntry(name, got.path, st.st_size, st.st_mtime_ns, report.sha256, report)
        with self._hub_lock:
            self._hub[key] = entry
            self._hub.move_to_end(key)
            while len(self._hub) > HUB_MEMO_ENTRIES:
                self._hub.popitem(last=False)
        return entry


def _memo_key(name: str) -> str:
    """One memo entry for the spellings of one Hub reference (a repo id and its URL)."""
    ref = parse_hub_lora(name)
    return name if ref is None else str(ref)


def _has_lora_keys(keys: list[str]) -> bool:
    """Whether tensor names look like an adapter's (any format we read), from a header alone."""
    return any(split_role(k) is not None or ".processor." in k for k in keys)


def _changed(entry: LoraEntry) -> bool:
    try:
        st = entry.path.stat()
    except OSError:
        return True
    return (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns)


# --- upload ---------------------------------------------------------------------------------------------------------

_UPLOAD_LOCK = threading.Lock()  # picking a free name and renaming onto it must not interleave


def _sanitise(original_name: str) -> str:
    base = re.split(r"[\\/]", original_name)[-1]
    stem = base[: -len(".safetensors")] if base.lower().endswith(".safetensors") else base.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:80] or "lora"


def check_upload_count(count: int, max_files: int = MAX_UPLOAD_FILES) -> None:
    """LoraError when one upload request carries more files than allowed (checked before any file is read)."""
    if count > max_files:
        raise LoraError(f"{count} files in one upload; at most {max_files} at a time. Upload them in smaller groups.")


def _folder_usage(folder: Path) -> tuple[int, int]:
    """(LoRA files, their bytes) in the folder, recursively; only regular files count, and none is opened."""
    files = total = 0
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            try:
                st = os.stat(Path(dirpath) / filename, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and filename.lower().endswith(".safetensors"):
                files, total = files + 1, total + st.st_size
    return files, total


def save_upload(
    src: Path,
    folder: Path,
    original_name: str,
    max_bytes: int = MAX_UPLOAD_BYTES,
    *,
    max_files: int = MAX_FOLDER_FILES,
    max_folder_bytes: int = MAX_FOLDER_BYTES,
) -> Path:
    """Store an uploaded LoRA in `folder` under a safe unique name; returns its path (an identical file is reused).

    The size and the folder's quotas are checked first and the header validated before any tensor byte is copied;
    the copy is validated again (what we keep is what we checked) and moved into place atomically.
    """
    src, folder = Path(src), Path(folder)
    size = src.stat().st_size
    if size > max_bytes:
        raise LoraError(f"{original_name} is {size / 1e6:g} MB; uploads are limited to {max_bytes / 1e6:g} MB.")
    files, used = _folder_usage(folder)
    if files >= max_files:
        raise LoraError(
            f"The LoRA folder already holds {files} LoRA files, its limit is {max_files}; remove some before "
            "uploading more."
        )
    if used + size > max_folder_bytes:
        raise LoraError(
            f"{original_name} ({size / 1e6:g} MB) would take the LoRA folder past its {max_folder_bytes / 1e9:g} GB "
            f"limit ({used / 1e9:.2f} GB in use); remove some LoRAs before uploading more."
        )
    read_safetensors_header(src)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    os.fchmod(fd, new_file_mode())  # as any file the user saves, not mkstemp's 0600
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            while chunk := inp.read(1 << 22):
                digest.update(chunk)
                out.write(chunk)
                if out.tell() > max_bytes:
                    raise LoraError(f"{original_name} grew past {max_bytes / 1e6:g} MB while being copied.")
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
