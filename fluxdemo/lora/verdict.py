"""The verdict on a LoRA file's keys for one model: header shapes in, matched and unmatched keys, the family it was
made for, and problems out."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from fluxdemo.lora.deltas import delta_shape, peft_alpha
from fluxdemo.lora.keys import (
    APPLIED_KINDS,
    NOT_LINEAR_DELTA,
    REFUSED_KINDS,
    SD_UNET,
    Adapter,
    ModelTables,
    group_keys,
)

CONTROL_INPUTS = {128: "a FLUX.1 Canny/Depth control LoRA", 384: "a FLUX.1 Fill LoRA"}  # img_in input width
SD_CONTEXT = {2048: "SDXL", 1024: "SD2.x", 768: "SD1.5"}  # cross-attention to_k input width -> base model
# Full deltas become an exact (B, A) pair of rank min(out, in), in float32; above this many bytes in all (a whole-model
# FULL_DIFF save is the model's size) we refuse rather than hold several GB per adapter. LoKr/LoHa stay factored.
DENSE_MAX_BYTES = 2**30
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})  # upcast to float32 when read: every value is exact in float32
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"}) | FP8_DTYPES
MAX_META_CHARS = 200  # of a metadata value read for a family name: what a name needs, whatever the file holds
_NO_ADAPTER = "keys that form no adapter (an alpha without weights, or LoRA and LyCORIS keys on one module)"


@dataclass
class KeyAnalysis:
    """What a file's keys adapt in one model, what is wrong with them, and what to convert."""

    format: str = ""
    naming: str = "unknown"
    plan: list[tuple[Adapter, float]] = field(default_factory=list)  # adapters to convert, with their scale
    ranks: list[int] = field(default_factory=list)
    alphas: list[float | None] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    modules: Counter = field(default_factory=Counter)  # group -> diffusers modules adapted
    t5: bool = False
    matched: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _modules(n: int) -> str:
    return f"{n} module" if n == 1 else f"{n} modules"


def _is_noop(a: Adapter, read: Callable[[str], torch.Tensor]) -> bool:
    """True when the part has no effect: a LoRA with an all-zero half, or all-zero full deltas."""
    zero = [not bool(read(k).float().any()) for r, k in a.keys.items() if r != "alpha"]  # float(): fp8 has no any()
    return any(zero) if a.kind == "lora" else all(zero)


class _Checker:
    """Walks a file's adapters once: every key ends matched or unmatched, every fault becomes a problem."""

    def __init__(self, shapes, dtypes, meta, read, tables: ModelTables, model: str) -> None:
        self.shapes, self.dtypes, self.meta = shapes, dtypes, meta
        self.read, self.tables, self.model = read, tables, model
        self.r = KeyAnalysis()
        self.misfits: list[tuple[Adapter, int, int]] = []
        self.unknown: list[Adapter] = []
        self.refused: Counter = Counter()
        self.owners: dict[str, str] = {}
        self.t5_live = self.dense_bytes = self.fp8 = self.deltas = self.biases = 0

    def run(self) -> KeyAnalysis:
        adapters, loose = group_keys(sorted(self.shapes), self.tables)
        self.r.unmatched += loose
        for a in adapters:
            (self.r.matched if self.adapter(a) else self.r.unmatched).extend(a.keys.values())
        self.r.problems[:0] = self.headline(adapters, loose)
        self.r.problems += [f"{reason} ({_modules(n)})" for reason, n in self.refused.items()]
        if self.t5_live:
            self.r.problems.append(
                f"it also adapts the T5 text encoder ({_modules(self.t5_live)}); applying a LoRA to the quantized T5 "
                "is not supported, and without that part the result would not be what was trained"
            )
        elif self.r.t5:
            self.r.warnings.append("its T5 part is all zeros (no effect) and is ignored")
        if self.fp8:
            self.r.warnings.append(
                f"{_modules(self.fp8)} store fp8 weights (float8_e4m3fn/e5m2); they are upcast to float32 and applied"
            )
        if self.deltas or self.biases:
            self.r.warnings.append(
                f"full deltas applied as extra delta modules: {self.deltas} weight (.diff), "
                f"{self.biases} bias (.diff_b)"
            )
        if self.dense_bytes > DENSE_MAX_BYTES:
            self.r.problems.append(
                f"its full deltas (.diff) need {self.dense_bytes / 2**30:.1f} GB as exact LoRA factors (the limit is "
                f"{DENSE_MAX_BYTES / 2**30:.0f} GB): a whole-model full delta is not supported; extract a LoRA from "
                "it (e.g. ComfyUI's LoraSave with a rank) and use that"
            )
        # The transformer's keys name the format; a file that adapts only text encoders is named by theirs.
        namings = Counter(a.resolved.naming for a in adapters if a.resolved.family == "flux") or Counter(
            a.resolved.naming for a in adapters if a.resolved.family in ("clip", "t5")
        )
        self.r.naming = namings.most_common(1)[0][0] if namings else "unknown"
        kinds = Counter(a.kind for a in adapters)
        special = (("lokr", "lycoris-lokr"), ("loha", "lycoris-loha"), ("dora", "dora"))
        fallback = "full-delta" if set(kinds) <= {"full", "bias"} else self.r.naming
        self.r.format = self.r.format or next((f for kind, f in special if kinds[kind]), fallback)
        return self.r

    def adapter(self, a: Adapter) -> bool:
        """Check one adapter; True when its keys count as matched (applied, or a harmless all-zero part)."""
        kind, target = a.kind, a.resolved.target
        full = kind in ("full", "bias")
        if kind not in APPLIED_KINDS or (full and target is None):
            if (kind in REFUSED_KINDS or full) and _is_noop(a, self.read):  # e.g. all-zero `diff` norms trainers save
                self.r.warnings.append(f"{a.module}: all-zero {kind} weights, ignored (they have no effect)")
                return True
            self.refused[NOT_LINEAR_DELTA if full else REFUSED_KINDS.get(kind, _NO_ADAPTER)] += 1
            return False
        if target is None:
            self.unknown.append(a)
            return False
        try:
            (out, inp), rank, exact_rank = delta_shape(a, self.shapes)
        except ValueError as e:
            self.r.problems.append(f"{a.module} {e}")
            return False
        if exact_rank == 0:  # zero-size factors: PEFT refuses r=0 at load time, and they would change nothing
            self.r.problems.append(f"{a.module} has rank 0 (empty factors)")
            return False
        if any(self.dtypes[k] not in FLOAT_DTYPES for r, k in a.keys.items() if r != "alpha"):
            self.r.problems.append(f"{a.module} has non-floating-point weights")
            return False
        self.fp8 += any(self.dtypes[k] in FP8_DTYPES for k in a.keys.values())
        if "diff_b" in a.keys and self.shapes[a.keys["diff_b"]] != (out,):
            self.r.problems.append(
                f"{a.module} has a bias delta of shape {list(self.shapes[a.keys['diff_b']])}, the module {out} rows"
            )
            return False
        if target.component == "t5":
            self.r.t5 = True
            self.r.modules["t5"] += 1
            self.t5_live += not _is_noop(a, self.read)
            return True
        alpha, scale = self.scale(a, rank)
        if not full:  # a full or bias delta has no rank or alpha: it is applied as it is, times the strength
            self.r.ranks.append(rank)
            self.r.alphas.append(alpha)
            self.r.scales.append(scale)
        self.deltas += "diff" in a.keys
        self.biases += "diff_b" in a.keys
        if target.shape is not None and (out, inp) != target.shape:
            self.misfits.append((a, out, inp))
            return False
        if kind == "full":
            self.dense_bytes += 4 * exact_rank * (out + inp)
        for part, _ in target.parts:
            if part in self.owners:
                self.r.problems.append(f"{part} is adapted twice, by {self.owners[part]} and {a.module}")
            self.owners[part] = a.module
            self.r.modules[target.group] += 1
        self.r.plan.append((a, scale))
        return True

    def scale(self, a: Adapter, rank: int) -> tuple[float | None, float]:
        """(alpha, alpha / rank): a stored .alpha, else PEFT metadata, else none (scale 1); XLabs stores none."""
        alpha, rslora = None, False
        if "alpha" in a.keys:
            alpha = float(self.read(a.keys["alpha"]).float().reshape(-1)[0])
        elif a.kind == "lora" and a.resolved.naming != "xlabs":
            alpha, rslora = peft_alpha(self.meta, a.resolved.target.component, a.resolved.target.name) or (None, False)
        if alpha is not None and not math.isfinite(alpha):
            self.r.problems.append(f"{a.module}: its alpha is {alpha}")
        # A LoKr with both factors full (rank 0 here) has no alpha scaling in LyCORIS; no alpha means alpha = rank.
        if alpha is None or rank == 0:
            return alpha, 1.0
        return alpha, alpha / (math.sqrt(rank) if rslora else rank)

    def headline(self, adapters: list[Adapter], loose: list[str]) -> list[str]:
        """The main reason a file does not fit (another model, a control LoRA, another width), then the details."""
        family = _family(adapters, self.shapes, self.meta)
        if family:
            self.r.format, name, evidence = family
            article = "an" if name.startswith("SD") else "a"
            return [f"{article} {name} LoRA: it does not fit {self.model} ({evidence})"]
        other = _other_model(adapters, self.shapes)
        if other:
            self.r.format = other[0]
            return [other[1]]
        if not adapters:
            self.r.format = "none"
            example = f", e.g. {loose[0]!r}" if loose else ""
            return [f"no LoRA weights in this file ({len(self.shapes)} tensors, none named like a LoRA{example})"]
        dims = self.tables.dims
        for a, _, inp in self.misfits:
            if a.resolved.target.name in ("img_in", "x_embedder") and inp in CONTROL_INPUTS:
                self.r.format = "bfl-control"
                return [
                    f"{CONTROL_INPUTS[inp]} (img_in takes {inp} input channels, {self.model} {dims.in_channels}): "
                    "it needs the control model, not FLUX.1-dev"
                ]
        widths = Counter(  # in_features of the transformer linears that read the hidden state: the file's width
            inp
            for a, _, inp in self.misfits
            if a.resolved.target.component == "transformer" and a.resolved.target.shape[1] == dims.inner
        )
        if widths and widths.most_common(1)[0][0] != dims.inner:
            return [
                f"made for a model of width {widths.most_common(1)[0][0]}, but {self.model} has width {dims.inner} "
                f"({len(self.misfits)} modules do not fit)"
            ]
        lines = []
        if self.unknown and not self.r.matched:
            lines.append(
                f"none of its {len(adapters)} LoRA modules exist in {self.model} (e.g. {self.unknown[0].module}): "
                "a LoRA for another model"
            )
        elif self.unknown:
            notes = "; ".join(a.resolved.note or a.module for a in self.unknown[:3])
            lines.append(f"{len(self.unknown)} LoRA modules match nothing in {self.model}: {notes}")
        if self.misfits:
            examples = "; ".join(
                f"{a.module} is {out}x{inp}, {a.resolved.target.name} {'x'.join(map(str, a.resolved.target.shape))}"
                for a, out, inp in self.misfits[:3]
            )
            lines.append(f"{len(self.misfits)} modules do not fit the shapes of {self.model} (e.g. {examples})")
        if loose:
            lines.append(
                f"{len(loose)} tensors are not LoRA weights (e.g. {loose[0]!r}); full weights cannot be applied "
                "as an adapter"
            )
        return lines


# Model families whose LoRAs look like FLUX.1-dev's. FLUX.2 (BFL flux2/model.py; diffusers' Flux2Transformer2DModel):
# model-wide modulation (double_stream_modulation_img/txt, single_stream_modulation), a SwiGLU MLP (mlp_ratio 3, the
# gate and up rows fused: img_mlp.0 has 6x width rows, linear1 9x), diffusers' ff.linear_in/out and single blocks'
# attn.to_qkv_mlp_proj; klein 4B is as wide as FLUX.1 (3072), so its attention LoRAs fit FLUX.1 shape for shape.
# Chroma adds distilled_guidance_layer. Kontext, Fill, Canny and Depth share FLUX.1-dev's layout (Fill/Canny/Depth
# widen img_in, see CONTROL_INPUTS); a LoRA without such keys is told apart only by its metadata.
_FLUX2_KEYS = re.compile(
    r"double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj|(?:^|[._])ff(?:_context)?[._]linear_(?:in|out)"
)
_CHROMA_KEYS = re.compile(r"distilled_guidance_layer")
_SD3_KEYS = re.compile(r"(?:^|[._])(?:context_block|x_block)[._]|transformer_blocks[._]\d+[._]attn2[._]")
_ATTN_Q = re.compile(r"transformer_blocks[._]\d+[._]attn[._]to_q$")
_FLUX2_MLP = ((re.compile(r"single_blocks[._]\d+[._]linear1$"), 9), (re.compile(r"(?:img|txt)_mlp[._]0$"), 6))
_WIDTHS = {3072: "FLUX.2 klein 4B", 4096: "FLUX.2 klein 9B", 6144: "FLUX.2 dev"}  # FLUX.2 hidden sizes
SD3_WIDTHS = {1536: "SD3 Medium / SD3.5 Medium", 2432: "SD3.5 Large"}
_FLUX2 = re.compile(r"flux[-_. ]?2")


def _in_order(text: str, *words: str) -> bool:
    """Whether the words occur in `text` in this order: what `a.*b` asks, without its backtracking."""
    at = 0
    for word in words:
        at = text.find(word, at)
        if at < 0:
            return False
        at += len(word)
    return True


# (test of modelspec.architecture / ss_base_model_version, family, format); the first match wins.
_META_FAMILIES: tuple[tuple[Callable[[str], bool], str, str], ...] = (
    (lambda spec: "klein" in spec, "FLUX.2 klein", "flux2-klein"),
    (lambda spec: _FLUX2.search(spec) is not None, "FLUX.2", "flux2"),
    (lambda spec: "kontext" in spec, "FLUX.1 Kontext", "flux1-kontext"),
    (lambda spec: _in_order(spec, "flux", "fill"), "FLUX.1 Fill", "flux1-fill"),
    (lambda spec: _in_order(spec, "flux", "canny"), "FLUX.1 Canny", "flux1-canny"),
    (lambda spec: _in_order(spec, "flux", "depth"), "FLUX.1 Depth", "flux1-depth"),
    (lambda spec: "chroma" in spec, "Chroma", "chroma"),
)


# Other model families, each told by module names FLUX.1-dev has none of (in diffusers', musubi-tuner's kohya-style
# and ai-toolkit's spellings: Qwen-Image's transformer_blocks.N.img_mlp/txt_mod, Wan's blocks.N.self_attn/cross_attn/
# ffn, HunyuanVideo's img_mlp.fc1, img_mod.linear and dotted img_attn_qkv) or by musubi-tuner's metadata
# (modelspec.architecture "Qwen-Image/lora", "wan2.1/lora", "hunyuan-video/lora", "framepack/lora"; ss_network_module
# networks.lora_qwen_image, networks.lora_wan, networks.lora_framepack). ai-toolkit writes no family in its metadata.
_OTHER_FAMILIES: tuple[tuple[str, str, re.Pattern, tuple[str, ...]], ...] = (
    (
        "qwen-image",
        "Qwen-Image",
        re.compile(r"transformer_blocks[._]\d+[._](?:img|txt)_(?:mlp|mod)(?:[._]|$)"),
        ("qwen-image", "qwen_image"),
    ),
    (
        "wan",
        "Wan",
        re.compile(r"(?:^|\.|lora_unet_)blocks[._]\d+[._](?:self_attn|cross_attn|ffn)(?:[._]|$)"),
        ("wan",),
    ),
    (
        "hunyuan-video",
        "HunyuanVideo",
        re.compile(
            r"(?:img|txt)_(?:mlp[._]fc[12]|mod[._]linear)|(?:^|[._])modulation[._]linear|individual_token_refiner"
            r"|double_blocks\.\d+\.(?:img|txt)_attn_(?:qkv|proj)"
        ),
        ("hunyuan", "framepack"),
    ),
)
_META_WORD = re.compile(r"[a-z0-9_-]+")


def _other_family(adapters: list[Adapter], meta: Mapping[str, str]) -> tuple[str, str, str] | None:
    """(format, family, evidence) when a key or musubi-tuner's metadata names a family of _OTHER_FAMILIES."""
    for fmt, name, keys, _ in _OTHER_FAMILIES:
        key = next((a.module for a in adapters if keys.search(a.module)), None)
        if key:
            return fmt, name, f"its key {key} is {name}'s"
    arch = meta.get("modelspec.architecture", "")[:MAX_META_CHARS].lower()
    module = meta.get("ss_network_module", "")[:MAX_META_CHARS].lower().rpartition(".lora_")[2]
    words = {*_META_WORD.findall(arch.partition("/")[0]), module}
    for fmt, name, _, tells in _OTHER_FAMILIES:
        if any(word.startswith(tells) for word in words if word):
            said = arch or meta.get("ss_network_module", "")[:MAX_META_CHARS]
            return fmt, name, f"its metadata names {said.strip()[:80]!r}"
    return None


def _in_out(a: Adapter, shapes: Mapping[str, tuple]) -> tuple[int, int] | None:
    try:
        return delta_shape(a, shapes)[0]
    except (ValueError, KeyError, AttributeError):
        return None


def _family(adapters: list[Adapter], shapes: Mapping[str, tuple], meta: Mapping[str, str]) -> tuple | None:
    """(format, family, evidence) when the keys, shapes or metadata say the file is for a FLUX.1 look-alike or for
    another family whose LoRAs share some of FLUX.1's module names."""
    other = _other_family(adapters, meta)
    if other:
        return other
    flux2 = next((a.module for a in adapters if _FLUX2_KEYS.search(a.module)), None)
    evidence = f"its key {flux2} is FLUX.2's" if flux2 else ""
    for a in adapters if not flux2 else ():
        io = _in_out(a, shapes)
        for pattern, ratio in _FLUX2_MLP:
            if io and pattern.search(a.module) and io[0] == ratio * io[1]:
                flux2, evidence = a.module, f"its {a.module} has {io[0]} rows for width {io[1]}, FLUX.2's SwiGLU MLP"
    spec = " ".join(meta.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    found = next(((name, fmt) for names, name, fmt in _META_FAMILIES if names(spec)), None)
    if found and found[1] != "flux2":  # the metadata names a FLUX.1 look-alike: the keys cannot tell them apart
        return found[1], found[0], f"its metadata names {spec.strip()[:80]!r}"
    if flux2 or found:
        widths = Counter(
            io[1] for a in adapters if re.search(r"qkv|to_q$|linear1$", a.module) and (io := _in_out(a, shapes))
        )
        width = widths.most_common(1)[0][0] if widths else 0
        name = _WIDTHS.get(width, "FLUX.2")
        return (
            ("flux2-klein" if "klein" in name else "flux2"),
            name,
            evidence or f"its metadata names {spec.strip()[:80]!r}",
        )
    chroma = next((a.module for a in adapters if _CHROMA_KEYS.search(a.module)), None)
    if chroma:
        return "chroma", "Chroma", f"its key {chroma} is Chroma's"
    sd3 = next((a for a in adapters if _SD3_KEYS.search(a.module) and not SD_UNET.search(a.module)), None)
    if sd3:
        io = _in_out(sd3, shapes)
        return "sd3", SD3_WIDTHS.get(io[1] if io else 0, "SD3 / SD3.5"), f"its key {sd3.module} is SD3's MMDiT"
    for a in adapters:  # diffusers names SD3's attention like FLUX.1's: its width tells them apart
        io = _in_out(a, shapes)
        if io and io[1] in SD3_WIDTHS and _ATTN_Q.search(a.module):
            return "sd3", SD3_WIDTHS[io[1]], f"its {a.module} reads width {io[1]}, SD3's"
    return None


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
            version = SD_CONTEXT.get(shapes[a.keys["down"]][1], version)
            break
    example = next((a for a in adapters if a.resolved.family == "sd"), None) or next(
        a for a in adapters if a.resolved.family == "sdxl-te2"
    )
    naming = "kohya" if example.module.startswith("lora_") else "diffusers"
    return version.lower().replace(".", "").replace("/", "-"), (
        f"an {version} LoRA ({naming} naming: {example.module}), not FLUX: it adapts a UNet FLUX.1-dev does not have"
    )


def analyse_keys(
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str],
    meta: Mapping[str, str],
    read: Callable[[str], torch.Tensor],
    tables: ModelTables,
    model: str,
) -> KeyAnalysis:
    """The verdict on a file's keys for the model in `tables` (named `model` in messages).

    read(key) is called only for alphas and for the parts (T5, full deltas) whose effect depends on being all zero.
    """
    return _Checker(shapes, dtypes, meta, read, tables, model).run()
