"""LoRA key formats for FLUX.1: which module each tensor adapts, in which role, and the exact delta each kind encodes.

Our own parser, because diffusers' converters (loaders/lora_conversion_utils.py) hard-code FLUX.1-dev's width (3072)
and block counts (19/38), drop T5 and `diff` keys with only a log line, and accept wrong shapes until inference.
Names are parsed width-agnostically against the tables of fluxdemo.model.names, so every key of a file ends up
matched to a module of the model in hand (shapes checked) or unmatched with a reason (analyse_keys).

Naming families (found per key from its prefix): diffusers/PEFT (`transformer.<diffusers module>.lora_A.weight`),
kohya (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `lora_te1_` CLIP-L, `lora_te3_` T5), ComfyUI
(`diffusion_model.<BFL module>`), bare BFL names (BFL control LoRAs), fal/Kontext (`base_model.model.<BFL>`), XLabs
(`double_blocks.0.processor.qkv_lora1.down.weight`), and LyCORIS/kohya with diffusers names (`lycoris_`,
`lora_transformer_`). Adapter kinds: LoRA, full and bias deltas (converted exactly), LyCORIS LoKr and LoHa (kept
factored), DoRA (refused).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from fluxdemo.model.names import SWAPPED_HALVES, FluxDims, bfl_linear_shapes, fused_map, linear_map

# Key suffix -> role (whole dotted segments; the longest matching suffix wins).
ROLE_SUFFIXES: dict[str, str] = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora.down.weight": "down",  # diffusers' pre-PEFT attention-processor LoRAs
    ".lora.up.weight": "up",
    ".alpha": "alpha",
    **{f".lokr_{w}": f"lokr_{w}" for w in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")},
    **{f".hada_{w}": f"hada_{w}" for w in ("w1_a", "w1_b", "w2_a", "w2_b")},
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".dora_scale": "dora",
    ".lora_magnitude_vector": "dora",
    ".lora_magnitude_vector.weight": "dora",
    ".lora_B.bias": "lora_bias",
    ".lora_mid.weight": "tucker",  # LoCon / LyCORIS Tucker cores: convolution-only, FLUX has no convolutions
    ".lokr_t2": "tucker",
    ".hada_t1": "tucker",
    ".hada_t2": "tucker",
}

# diff_b (a bias delta) rides along with whatever else adapts its module, like alpha; alone it makes a "bias" adapter.
KIND_OF_ROLE = {"down": "lora", "up": "lora", "diff": "full", "dora": "dora"}
KIND_OF_ROLE |= {r: "lokr" for r in ROLE_SUFFIXES.values() if r.startswith("lokr_")}
KIND_OF_ROLE |= {r: "loha" for r in ROLE_SUFFIXES.values() if r.startswith("hada_")}
KIND_OF_ROLE |= {"lora_bias": "unsupported", "tucker": "unsupported"}

# Why a kind cannot be applied as a LoRA adapter (the caller turns these into problems).
REFUSED_KINDS = {
    "dora": "DoRA needs the base weight norm; not supported yet",
    "unsupported": "LoRA biases and Tucker/convolution cores (lora_B.bias, lora_mid, lokr_t2, hada_t*) "
    "are not supported for FLUX",
}
# Full deltas (.diff, .diff_b) are applied on linear layers as an extra delta module; anywhere else (a norm scale) they
# would have to be written into the base weights, which this app never changes (strength 0 must stay bit-identical).
NOT_LINEAR_DELTA = (
    "full weight deltas (.diff/.diff_b) on modules that are not linear layers (e.g. norm scales) would have to change "
    "the base weights, which this app never does"
)
APPLIED_KINDS = frozenset({"lora", "lokr", "loha", "full", "bias"})

# SD1.x/SD2/SDXL UNet blocks (diffusers and original LDM spellings) and SD3's MMDiT: another model entirely.
_SD_UNET = re.compile(r"(?:^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]\d")
_SD3 = re.compile(r"(?:^|[._])joint_blocks[._]\d")


@dataclass(frozen=True)
class Target:
    """A module of the model a LoRA adapts: the diffusers modules it becomes, in row order, and its shape."""

    component: str  # "transformer" | "text_encoder" (CLIP-L) | "t5"
    name: str  # canonical name in the file's namespace (BFL, diffusers, or Hugging Face CLIP/T5)
    parts: tuple[tuple[str, int], ...]  # (diffusers module, output rows); one part = a plain linear
    shape: tuple[int, int] | None  # (out, in) the delta must have; None where the model is not ours to check (T5)
    group: str  # double_blocks | single_blocks | embedders | final_layer | clip | t5
    swap_halves: bool = False  # BFL (shift, scale) rows vs diffusers (scale, shift): flux_names.SWAPPED_HALVES


@dataclass(frozen=True)
class Resolved:
    """What one key's module name resolves to."""

    naming: str  # peft | kohya | comfyui | bfl | fal-kontext | xlabs | kohya-diffusers | lycoris-diffusers
    family: str  # flux | clip | t5 | sd | sdxl-te2 | sd3 | unknown
    target: Target | None
    note: str = ""  # why a FLUX/CLIP name has no target here (e.g. a block this model does not have)


@dataclass
class Adapter:
    """The keys of one adapted module in a file, grouped by role."""

    module: str  # the key prefix as spelled in the file
    resolved: Resolved
    keys: dict[str, str] = field(default_factory=dict)  # role -> key

    @functools.cached_property  # asked for often, and only once all of the module's keys are grouped
    def kind(self) -> str:
        kinds = {KIND_OF_ROLE[r] for r in self.keys if r not in ("alpha", "diff_b")}
        for refused in ("unsupported", "dora"):  # the hardest part decides
            if refused in kinds:
                return refused
        if not kinds:
            return "bias" if "diff_b" in self.keys else "alpha-only"
        return kinds.pop() if len(kinds) == 1 else "mixed"


def _group(name: str) -> str:
    if name.startswith(("double_blocks.", "transformer_blocks.")):
        return "double_blocks"
    if name.startswith(("single_blocks.", "single_transformer_blocks.")):
        return "single_blocks"
    return "final_layer" if name.startswith(("final_layer.", "proj_out", "norm_out.")) else "embedders"


# Dims that list every module name once (one block of each kind, guidance present) for the width-free name tables.
_TEMPLATE = FluxDims(1, 4, 1, 1, 1, 1, 1, True)


@dataclass(frozen=True)
class _Namespace:
    """Module names of one spelling family (BFL or diffusers), dotted or with kohya's underscores, per block kind."""

    block: re.Pattern  # "<block prefix>[._]<index>[._]<rest>"
    names: dict[str, dict[str, str]]  # block prefix ("" for top level) -> {spelling: dotted name inside it}

    @classmethod
    def of(cls, names: list[str], blocks: tuple[str, str]) -> _Namespace:
        def spellings(dotted: list[str]) -> dict[str, str]:
            return {n: n for n in dotted} | {n.replace(".", "_"): n for n in dotted}

        inside = {b: [n.removeprefix(f"{b}.0.") for n in names if n.startswith(f"{b}.0.")] for b in blocks}
        top = [n for n in names if not n.startswith(tuple(f"{b}." for b in blocks))]
        table = {b: spellings(inside[b]) for b in blocks} | {"": spellings(top)}
        alternatives = "|".join(sorted(blocks, key=len, reverse=True))
        return cls(re.compile(rf"({alternatives})[._](\d+)[._](.+)"), table)

    def parse(self, module: str) -> str | None:
        """The dotted name if `module` spells one of ours (any block index, dots or underscores), else None."""
        m = self.block.fullmatch(module)
        if m is None:
            return self.names[""].get(module)
        rest = self.names[m[1]].get(m[3])
        return f"{m[1]}.{m[2]}.{rest}" if rest else None


_BFL = _Namespace.of(list(bfl_linear_shapes(_TEMPLATE)), ("double_blocks", "single_blocks"))
_DIFFUSERS = _Namespace.of(
    list(linear_map(_TEMPLATE).values()) + [p for f in fused_map(_TEMPLATE).values() for p, _ in f.parts],
    ("transformer_blocks", "single_transformer_blocks"),
)
_CLIP = re.compile(
    r"text_model[._]encoder[._]layers[._](\d+)[._](self_attn[._][qkv]_proj|self_attn[._]out_proj|mlp[._]fc[12])"
)
_T5 = re.compile(
    r"encoder[._]block[._](\d+)[._]layer[._](\d+)[._](SelfAttention[._][qkvo]|DenseReluDense[._](?:wi_0|wi_1|wi|wo))"
)
_XLABS = re.compile(
    r"(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora([12]?)\.(down|up)\.weight"
)


def _dotted_clip(m: re.Match) -> str:
    sub = m[2].replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
    return f"text_model.encoder.layers.{m[1]}.{sub}"


def _dotted_t5(m: re.Match) -> str:
    sub = m[3].replace("SelfAttention_", "SelfAttention.").replace("DenseReluDense_", "DenseReluDense.")
    return f"encoder.block.{m[1]}.layer.{m[2]}.{sub}"


class ModelTables:
    """Every module of one model (transformer dims + CLIP-L config) a LoRA may target, in each spelling."""

    def __init__(self, dims: FluxDims, clip_config: Mapping) -> None:
        self.dims = dims
        shapes = bfl_linear_shapes(dims)
        self.bfl: dict[str, Target] = {}
        self.diffusers: dict[str, Target] = {}
        for bfl, diff in linear_map(dims).items():
            group = _group(bfl)
            self.bfl[bfl] = Target(
                "transformer", bfl, ((diff, shapes[bfl][0]),), shapes[bfl], group, bfl in SWAPPED_HALVES
            )
            self.diffusers[diff] = Target("transformer", diff, ((diff, shapes[bfl][0]),), shapes[bfl], group)
        for bfl, fused in fused_map(dims).items():
            group = _group(bfl)
            self.bfl[bfl] = Target("transformer", bfl, fused.parts, shapes[bfl], group)
            for part, rows in fused.parts:
                self.diffusers[part] = Target("transformer", part, ((part, rows),), (rows, shapes[bfl][1]), group)
        hidden, inter = clip_config["hidden_size"], clip_config["intermediate_size"]
        self.clip: dict[str, Target] = {}
        for i in range(clip_config["num_hidden_layers"]):
            p = f"text_model.encoder.layers.{i}"
            for sub, shape in [(f"self_attn.{x}_proj", (hidden, hidden)) for x in ("q", "k", "v", "out")] + [
                ("mlp.fc1", (inter, hidden)),
                ("mlp.fc2", (hidden, inter)),
            ]:
                self.clip[f"{p}.{sub}"] = Target(
                    "text_encoder", f"{p}.{sub}", ((f"{p}.{sub}", shape[0]),), shape, "clip"
                )

    def flux(self, dotted: str, table: dict[str, Target], naming: str) -> Resolved:
        target = table.get(dotted)
        note = "" if target else f"{dotted}: this model has no such module ({self._size()})"
        return Resolved(naming, "flux", target, note)

    def _size(self) -> str:
        d = self.dims
        return f"{d.num_double} double + {d.num_single} single blocks" + ("" if d.guidance else ", no guidance_in")

    def xlabs(self, m: re.Match) -> Resolved:
        """XLabs processors: lora1 = image stream, lora2 = text; single blocks adapt only linear1's q,k,v rows."""
        kind, i, what, stream = m[1], m[2], m[3], m[4]
        if kind == "double_blocks":
            side = "txt" if stream == "2" else "img"
            return self.flux(f"double_blocks.{i}.{side}_attn.{what}", self.bfl, "xlabs")
        if what == "proj":
            return self.flux(f"single_blocks.{i}.linear2", self.bfl, "xlabs")
        linear1 = self.bfl.get(f"single_blocks.{i}.linear1")
        if linear1 is None:
            return self.flux(f"single_blocks.{i}.linear1", self.bfl, "xlabs")
        qkv = linear1.parts[:3]  # XLabs' qkv_lora adds to the first 3*inner rows of linear1, never to the MLP rows
        name = f"single_blocks.{i}.linear1[qkv]"
        return Resolved(
            "xlabs", "flux", Target("transformer", name, qkv, (3 * self.dims.inner, self.dims.inner), "single_blocks")
        )

    def clip_module(self, m: re.Match, naming: str) -> Resolved:
        dotted = _dotted_clip(m)
        target = self.clip.get(dotted)
        return Resolved(naming, "clip", target, "" if target else f"{dotted}: CLIP-L has no such layer")

    def resolve(self, module: str) -> Resolved:
        """The module a key prefix (the key without its role suffix) names, in whatever spelling the file uses."""
        for prefix, naming, spaces in _PREFIXES:
            if module.startswith(prefix):
                rest = module.removeprefix(prefix)
                for space in spaces:
                    found = _SPACES[space](self, rest, naming)
                    if found is not None:
                        return found
                break
        if _SD3.search(module):
            return Resolved("unknown", "sd3", None)
        return Resolved("unknown", "sd" if _SD_UNET.search(module) else "unknown", None)


def _in_bfl(t: ModelTables, rest: str, naming: str) -> Resolved | None:
    dotted = _BFL.parse(rest)
    return None if dotted is None else t.flux(dotted, t.bfl, "bfl" if naming in ("peft", "bare") else naming)


def _in_diffusers(t: ModelTables, rest: str, naming: str) -> Resolved | None:
    dotted = _DIFFUSERS.parse(rest)
    return None if dotted is None else t.flux(dotted, t.diffusers, "peft" if naming == "bare" else naming)


def _in_clip(t: ModelTables, rest: str, naming: str) -> Resolved | None:
    m = _CLIP.fullmatch(rest)
    return None if m is None else t.clip_module(m, "peft" if naming == "bare" else naming)


def _in_t5(t: ModelTables, rest: str, naming: str) -> Resolved | None:
    m = _T5.fullmatch(rest)
    name = _dotted_t5(m) if m else ""
    return None if m is None else Resolved(naming, "t5", Target("t5", name, ((name, 0),), None, "t5"))


def _in_te2(t: ModelTables, rest: str, naming: str) -> Resolved | None:
    """kohya `lora_te2_`: T5 in early sd-scripts FLUX files, CLIP-G (SDXL's second text encoder) otherwise."""
    return _in_t5(t, rest, naming) or (Resolved(naming, "sdxl-te2", None) if _CLIP.fullmatch(rest) else None)


_SPACES = {
    "bfl": _in_bfl,
    "diffusers": _in_diffusers,
    "clip": _in_clip,
    "t5": _in_t5,
    "te2": _in_te2,
}

# (prefix, naming, namespaces to try): the first prefix that matches decides; "" (bare names) comes last.
_PREFIXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("base_model.model.", "fal-kontext", ("bfl", "diffusers")),
    ("model.diffusion_model.", "comfyui", ("bfl",)),
    ("diffusion_model.", "comfyui", ("bfl",)),
    ("text_encoders.clip_l.transformer.", "comfyui", ("clip",)),
    ("text_encoders.t5xxl.transformer.", "comfyui", ("t5",)),
    ("lora_unet_", "kohya", ("bfl",)),
    ("lora_te1_", "kohya", ("clip",)),
    ("lora_te_", "kohya", ("clip",)),
    ("lora_te2_", "kohya", ("te2",)),
    ("lora_te3_", "kohya", ("t5",)),
    ("lora_transformer_", "kohya-diffusers", ("diffusers",)),
    ("lycoris_", "lycoris-diffusers", ("diffusers", "bfl")),
    ("transformer.", "peft", ("diffusers", "bfl")),
    ("text_encoder_2.", "peft", ("t5", "te2")),
    ("text_encoder.", "peft", ("clip",)),
    ("", "bare", ("diffusers", "bfl", "clip", "t5")),
)


def split_role(key: str) -> tuple[str, str] | None:
    """(module, role) for an adapter key, or None for a key that is no adapter tensor (a full weight, a norm)."""
    parts = key.split(".")
    for n in (3, 2, 1):  # role suffixes are 1 to 3 dotted segments; the longest match wins
        if len(parts) > n:
            role = ROLE_SUFFIXES.get("." + ".".join(parts[-n:]))
            if role is not None:
                return ".".join(parts[:-n]), role
    return None


def group_keys(keys: list[str], tables: ModelTables) -> tuple[list[Adapter], list[str]]:
    """Adapters (keys grouped by module, each resolved) and the keys that are no adapter tensor at all."""
    adapters: dict[str, Adapter] = {}
    loose: list[str] = []
    for key in keys:
        xlabs = _XLABS.fullmatch(key) if ".processor." in key else None
        if xlabs:
            module, role, resolved = key.rsplit(".", 2)[0], xlabs[5], tables.xlabs(xlabs)
        else:
            split = split_role(key)
            if split is None:
                loose.append(key)
                continue
            (module, role), resolved = split, None
        if module not in adapters:
            adapters[module] = Adapter(module, resolved or tables.resolve(module))
        adapters[module].keys[role] = key
    return list(adapters.values()), loose


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

    LoKr and LoHa are not turned into pairs: their exact rank can reach the layer's width; see fluxdemo.lycoris.
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


# ---------------------------------------------------------------------------------------------------------------
# The verdict on a file's keys for one model: header shapes in, matched/unmatched keys and problems out.

CONTROL_INPUTS = {128: "a FLUX.1 Canny/Depth control LoRA", 384: "a FLUX.1 Fill LoRA"}  # img_in input width
SD_CONTEXT = {2048: "SDXL", 1024: "SD2.x", 768: "SD1.5"}  # cross-attention to_k input width -> base model
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default: what diffusers uses when lora_adapter_metadata omits lora_alpha
# Full deltas become an exact (B, A) pair of rank min(out, in), in float32; above this many bytes in all (a whole-model
# FULL_DIFF save is the model's size) we refuse rather than hold several GB per adapter. LoKr/LoHa stay factored.
DENSE_MAX_BYTES = 2**30
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})  # upcast to float32 when read: every value is exact in float32
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"}) | FP8_DTYPES
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


def _in_out(a: Adapter, shapes: Mapping[str, tuple]) -> tuple[int, int] | None:
    try:
        return delta_shape(a, shapes)[0]
    except (ValueError, KeyError, AttributeError):
        return None


def _family(adapters: list[Adapter], shapes: Mapping[str, tuple], meta: Mapping[str, str]) -> tuple | None:
    """(format, family, evidence) when the keys, shapes or metadata say the file is for a FLUX.1 look-alike."""
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
    sd3 = next((a for a in adapters if _SD3_KEYS.search(a.module) and not _SD_UNET.search(a.module)), None)
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
