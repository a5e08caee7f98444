"""LoRA key formats for FLUX.1: which module each tensor adapts, and in which role.

Our own parser, because diffusers' converters (loaders/lora_conversion_utils.py) hard-code FLUX.1-dev's width (3072)
and block counts (19/38), drop T5 and `diff` keys with only a log line, and accept wrong shapes until inference.
Names are parsed width-agnostically against the tables of fluxdemo.model.names.

Naming families (found per key from its prefix): diffusers/PEFT (`transformer.<diffusers module>.lora_A.weight`),
kohya (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `lora_te1_` CLIP-L, `lora_te3_` T5), ComfyUI
(`diffusion_model.<BFL module>`), bare BFL names (BFL control LoRAs), fal/Kontext (`base_model.model.<BFL>`), XLabs
(`double_blocks.0.processor.qkv_lora1.down.weight`), and LyCORIS/kohya with diffusers names (`lycoris_`,
`lora_transformer_`). Adapter kinds: LoRA, full and bias deltas (converted exactly), LyCORIS LoKr and LoHa (kept
factored), DoRA (refused).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

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
# SD1.x/SDXL UNet blocks: numbered down/up blocks, and the one middle block (kohya: mid_block_attentions_0_...)
SD_UNET = re.compile(
    r"(?:^|[._])(?:(?:down_blocks|up_blocks|input_blocks|output_blocks)[._]\d|mid_block[._]|middle_block[._]\d)"
)
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
        return Resolved("unknown", "sd" if SD_UNET.search(module) else "unknown", None)


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
