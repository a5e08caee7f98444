"""File -> torch module, for each of FLUX's components, keeping the big ones quantized.

- transformer: GGUF with BFL names (city96 layout). The key set is validated first so that a wrong file gets a
  sentence instead of a KeyError, then renamed with our width-agnostic table (diffusers' converter hard-codes
  width 3072) and handed to diffusers' own GGUF loader, so the blocks stay packed as GGUFParameters.
- T5 encoder: GGUF with llama.cpp names, kept packed the same way (transformers' GGUF loader dequantizes it fully,
  9.5 GB for XXL); or safetensors, quantized to 8 bit with optimum-quanto.
- CLIP-L and the VAE: safetensors in full precision; the tokenizers from their folders.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from safetensors.torch import load_file

from fluxdemo.errors import ModelFileError
from fluxdemo.model.names import SWAPPED_HALVES, FluxDims, fused_map, linear_map, norm_map

logger = logging.getLogger(__name__)

# Prefixes that single-file FLUX checkpoints carry in the wild (ComfyUI saves "model.diffusion_model.").
_BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_IMG_IN_VARIANTS = {384: "FLUX.1 Fill (inpainting)", 128: "FLUX.1 Canny/Depth (control)"}
_FLOAT_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}


@dataclass(frozen=True)
class GGUFTensor:
    shape: tuple[int, ...]  # torch order (rows first)
    qtype: str  # GGMLQuantizationType name: Q8_0, F32, ...


@dataclass(frozen=True)
class LoadSummary:
    """What one load did: the product logs it as one line and keeps it in reports."""

    component: str
    file: str
    quant: str  # "Q8_0 (304), F32 (472)"
    parameters: int
    bytes: int  # in memory after loading (packed bytes for quantized weights)
    seconds: float

    def line(self) -> str:
        return (
            f"{self.component}: {self.file} | {self.quant} | {self.parameters / 1e6:,.1f} M params | "
            f"{self.bytes / 2**20:,.1f} MiB | {self.seconds:.2f} s"
        )


def read_config(config_dir: Path, component: str) -> dict:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = config_dir / component / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"No {component} config at {path}: the preset's config folder is incomplete.") from None


def model_dims(config_dir: Path) -> tuple[FluxDims, dict]:
    """The transformer's dimensions and the CLIP config, from the configs alone: what a LoRA for the model must fit."""
    return FluxDims.from_config(read_config(config_dir, "transformer")), read_config(config_dir, "text_encoder")


def _open_gguf(path: Path) -> gguf.GGUFReader:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path.name} is not a GGUF file (it starts with {magic!r}). Download it again.")
    try:
        # Memory-maps the file (a lying header fails here without allocating). "c" is a private, copy-on-write map:
        # its arrays are writable, so torch.from_numpy takes them without a warning, and should anything ever write
        # to a weight, the kernel copies that one page and the file stays as it is.
        return gguf.GGUFReader(path, "c")
    except Exception as e:  # gguf-py surfaces numpy's IndexError/ValueError/struct errors on damaged headers
        raise ModelFileError(f"{path.name} is not a readable GGUF file ({e}). Download it again.") from e


def _header(reader: gguf.GGUFReader) -> dict[str, GGUFTensor]:
    return {t.name: GGUFTensor(tuple(int(n) for n in reversed(t.shape)), t.tensor_type.name) for t in reader.tensors}


def gguf_tensors(path: Path) -> dict[str, GGUFTensor]:
    """Names, shapes and types of a GGUF file's tensors, read from its header (memory-mapped, nothing copied)."""
    return _header(_open_gguf(path))


def gguf_state_dict(reader: gguf.GGUFReader, file: str) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file as a view of its memory map: quantized ones as diffusers' GGUFParameter, F32/F16
    as plain tensors. diffusers' load_gguf_checkpoint does the same after `tensor.data.copy()`, which puts the whole
    file into anonymous memory (12.1 GB for FLUX.1-dev Q8_0) and costs the time to copy it; a view costs nothing until
    a weight is used, and then only page cache, which the kernel reads back from the file when it needs the RAM."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter

    state_dict: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        data = torch.from_numpy(tensor.data)
        if tensor.tensor_type in _FLOAT_TYPES:
            state_dict[tensor.name] = data
        elif tensor.tensor_type in SUPPORTED_GGUF_QUANT_TYPES:
            state_dict[tensor.name] = GGUFParameter(data, quant_type=tensor.tensor_type)
        else:
            raise ModelFileError(
                f"{file}: {tensor.name} is quantized as {tensor.tensor_type.name}, which diffusers cannot compute "
                "with. Use a file quantized as Q8_0, Q6_K, Q5_K, Q4_K, Q4_0 or another type diffusers supports."
            )
    return state_dict


def _quant_summary(tensors: dict[str, GGUFTensor]) -> str:
    counts = Counter(t.qtype for t in tensors.values())
    return ", ".join(f"{q} ({n})" for q, n in counts.most_common())


def _strip_prefix(names: dict[str, GGUFTensor]) -> tuple[dict[str, GGUFTensor], str]:
    for prefix in _BFL_PREFIXES:
        if any(n.startswith(prefix) for n in names):
            return {n.removeprefix(prefix): t for n, t in names.items()}, prefix
    return names, ""


def _count_blocks(names: dict[str, GGUFTensor], kind: str) -> set[int]:
    return {int(n.split(".")[1]) for n in names if n.startswith(f"{kind}.")}


def validate_transformer_keys(tensors: dict[str, GGUFTensor], config: dict, file: str) -> None:
    """Refuse, with a sentence, any file that is not the FLUX transformer the config describes."""
    names, _ = _strip_prefix(tensors)
    d = FluxDims.from_config(config)
    if not any(n.startswith(("double_blocks.", "single_blocks.")) for n in names):
        looks_like = "a T5 text encoder" if any(n.startswith("enc.blk.") for n in names) else "not FLUX"
        raise ModelFileError(
            f"{file} is {looks_like}: it has no double_blocks/single_blocks tensors. Point the transformer at a "
            "FLUX GGUF such as city96/FLUX.1-dev-gguf's flux1-dev-Q8_0.gguf."
        )
    img_in = names.get("img_in.weight")
    if img_in is not None and img_in.shape[-1] != d.in_channels and img_in.shape[-1] in _IMG_IN_VARIANTS:
        raise ModelFileError(
            f"{file} is {_IMG_IN_VARIANTS[img_in.shape[-1]]} (img_in takes {img_in.shape[-1]} channels, "
            f"text-to-image takes {d.in_channels}). Use the FLUX.1-dev text-to-image GGUF."
        )
    if d.guidance and "guidance_in.in_layer.weight" not in names:
        raise ModelFileError(
            f"{file} has no guidance_in: it is FLUX.1-schnell (or another guidance-free variant), not FLUX.1-dev. "
            "Use a FLUX.1-dev GGUF, or a schnell preset."
        )
    for kind, want in (("double_blocks", d.num_double), ("single_blocks", d.num_single)):
        have = _count_blocks(names, kind)
        missing = sorted(set(range(want)) - have)
        if missing:
            raise ModelFileError(
                f"{file} is incomplete: {kind} {_ranges(missing)} missing ({len(have)} of {want} present). "
                "The download was cut short or the file was pruned; download it again."
            )
    expected = _expected_bfl_keys(d)
    missing = sorted(expected - set(names))
    if missing:
        raise ModelFileError(f"{file} lacks {len(missing)} FLUX tensors, e.g. {missing[:3]}. Download it again.")
    qkv = names["double_blocks.0.img_attn.qkv.weight"]
    if qkv.shape[-1] != d.inner and qkv.qtype in ("F32", "F16", "BF16"):
        raise ModelFileError(
            f"{file} is a FLUX of width {qkv.shape[-1]}, the config says {d.inner}: it belongs to another model."
        )


def _ranges(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 1 and ids[-1] - ids[0] == len(ids) - 1 else ", ".join(map(str, ids))


def _expected_bfl_keys(d: FluxDims) -> set[str]:
    keys = set(norm_map(d))
    for module in (*linear_map(d), *fused_map(d)):
        keys |= {f"{module}.weight", f"{module}.bias"}
    return keys


def bfl_to_diffusers(state_dict: dict[str, torch.Tensor], d: FluxDims) -> dict[str, torch.Tensor]:
    """Rename (and split) a BFL-named transformer state dict into diffusers' names; works on packed GGUF rows too,
    because GGUF quantizes each row separately and splits/swaps move whole rows."""
    sd, _ = _strip_prefix(state_dict)
    out: dict[str, torch.Tensor] = {}
    for bfl, ours in linear_map(d).items():
        for p in ("weight", "bias"):
            tensor = sd[f"{bfl}.{p}"]
            if bfl in SWAPPED_HALVES:
                shift, scale = tensor.chunk(2, dim=0)
                tensor = torch.cat([scale, shift], dim=0)
            out[f"{ours}.{p}"] = tensor
    for bfl, fused in fused_map(d).items():
        for p in ("weight", "bias"):
            parts = torch.split(sd[f"{bfl}.{p}"], [rows for _, rows in fused.parts], dim=0)
            out.update({f"{name}.{p}": t for (name, _), t in zip(fused.parts, parts, strict=True)})
    out.update({ours: sd[bfl] for bfl, ours in norm_map(d).items()})
    return out


def file_backed(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The CPU tensors among (name, tensor) pairs whose bytes lie in a memory-mapped file, by name: weights that cost
    no anonymous RAM and can be moved to a device again without a copy kept in RAM. Read from /proc/self/maps, so
    Linux only (elsewhere: none, and the manager keeps RAM copies as before)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):  # an inode and a path: a file
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    ranges.sort()
    starts = [r[0] for r in ranges]
    found = {}
    for name, tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        ptr = tensor.untyped_storage().data_ptr()
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and ptr + tensor.untyped_storage().nbytes() <= ranges[i][1]:
            found[name] = tensor.data
    return found


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _loaded(
    component: str,
    path: Path,
    model: torch.nn.Module,
    quant: str,
    start: float,
    tensors: dict[str, GGUFTensor] | None = None,
) -> tuple[torch.nn.Module, LoadSummary]:
    """The load's one summary line, logged and returned with the model."""
    if tensors is not None:  # packed parameters report bytes as their shape; the header knows the real count
        params = sum(int(torch.Size(t.shape).numel()) for t in tensors.values())
    else:
        params = sum(p.numel() for p in model.parameters())
    summary = LoadSummary(component, path.name, quant, params, module_bytes(model), time.perf_counter() - start)
    logger.info(summary.line())
    return model, summary


def load_transformer(path: Path, config_dir: Path, compute_dtype: torch.dtype) -> tuple[torch.nn.Module, LoadSummary]:
    """The FLUX transformer from a BFL-named GGUF, blocks kept packed, computing in compute_dtype.

    The packed weights stay views of the file's memory map (nothing is read until a block runs or moves to a
    device); so do the F32 tensors when compute_dtype is float32, else they are cast (about 2% of the file)."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    start = time.perf_counter()
    config = read_config(config_dir, "transformer")
    reader = _open_gguf(path)
    tensors = _header(reader)
    validate_transformer_keys(tensors, config, path.name)
    try:  # the key check passed, but a tensor can still have a shape the config does not expect (a lying header)
        state_dict = bfl_to_diffusers(gguf_state_dict(reader, path.name), FluxDims.from_config(config))
        model = FluxTransformer2DModel.from_single_file(
            state_dict,
            config=str(config_dir),
            subfolder="transformer",
            quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
            torch_dtype=compute_dtype,
        )
    except (ValueError, RuntimeError) as e:  # diffusers' shape check, torch.split of a fused weight
        raise ModelFileError(f"{path.name} does not fit the transformer config ({e}). Download it again.") from e
    model.eval().requires_grad_(False)
    return _loaded("transformer", path, model, _quant_summary(tensors), start, tensors)


def _t5_gguf_to_hf(
    tensors: dict[str, torch.Tensor], hf_names: Iterable[str], num_layers: int
) -> dict[str, torch.Tensor]:
    # The name table is gguf-py's own (what llama.cpp wrote); we ask it for each HF name of the encoder.
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, num_layers)
    out: dict[str, torch.Tensor] = {}
    for hf in hf_names:
        name = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is not None and name in tensors:
            out[hf] = tensors[name]
    return out


def _dequantized(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    return (dequantize_gguf_tensor(t) if isinstance(t, GGUFParameter) else t).to(dtype)


def _packed_t5_ff():
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    class PackedGatedFF(T5DenseGatedActDense):
        # transformers casts wo's input to wo.weight.dtype, which is uint8 for a packed GGUF weight.
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            hidden = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
            return self.wo(self.dropout(hidden))

    return PackedGatedFF


def load_t5(path: Path, config_dir: Path, compute_dtype: torch.dtype) -> tuple[torch.nn.Module, LoadSummary]:
    """The T5 encoder from a llama.cpp-named GGUF (kept packed) or a safetensors file (quantized with quanto)."""
    if path.suffix == ".gguf":
        return _load_t5_gguf(path, config_dir, compute_dtype)
    return _load_t5_quanto(path, config_dir, compute_dtype)


def _load_t5_gguf(path: Path, config_dir: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, LoadSummary]:
    from diffusers.quantizers.gguf.utils import GGUFParameter, _replace_with_gguf_linear
    from transformers import T5Config, T5EncoderModel
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    start = time.perf_counter()
    config = T5Config(**read_config(config_dir, "text_encoder_2"))
    reader = _open_gguf(path)
    header = _header(reader)
    if "token_embd.weight" not in header or not any(n.startswith("enc.blk.") for n in header):
        raise ModelFileError(
            f"{path.name} is not a T5 encoder GGUF in llama.cpp naming (no token_embd/enc.blk tensors). Use e.g. "
            "city96/t5-v1_1-xxl-encoder-gguf's t5-v1_1-xxl-encoder-Q8_0.gguf."
        )
    with torch.device("meta"):
        model = T5EncoderModel(config)
    # Views of the file's memory map, as for the transformer: the packed weights are read when they are used.
    state_dict = _t5_gguf_to_hf(gguf_state_dict(reader, path.name), model.state_dict(), config.num_layers)
    expected = set(model.state_dict()) - {"encoder.embed_tokens.weight"}  # a tied alias, never stored
    missing = sorted(expected - set(state_dict))
    if missing:
        raise ModelFileError(
            f"{path.name} does not match the T5 config ({config.num_layers} layers, d_model {config.d_model}): "
            f"{len(missing)} tensors missing, e.g. {missing[:3]}."
        )
    # nn.Embedding cannot read packed rows; the embedding is 3% of T5-XXL.
    state_dict["shared.weight"] = _dequantized(state_dict["shared.weight"], dtype)
    _replace_with_gguf_linear(model, dtype, state_dict)
    packed_ff = _packed_t5_ff()
    for module in model.modules():
        if type(module) is T5DenseGatedActDense:
            module.__class__ = packed_ff
    for name, tensor in state_dict.items():
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name)
        if not isinstance(tensor, GGUFParameter):
            tensor = tensor.to(dtype)
        if tuple(module._parameters[param].shape) != tuple(_logical_shape(tensor)):
            raise ModelFileError(
                f"{path.name}: {name} has shape {tuple(_logical_shape(tensor))}, the T5 config expects "
                f"{tuple(module._parameters[param].shape)}. The file is for another T5 size."
            )
        module._parameters[param] = torch.nn.Parameter(tensor, requires_grad=False)
    model.tie_weights()
    model.eval()
    return _loaded("text_encoder_2", path, model, _quant_summary(header), start, header)


def _logical_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(t, "quant_shape", t.shape))


def _load_t5_quanto(path: Path, config_dir: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, LoadSummary]:
    from optimum.quanto import freeze, qint8, quantize
    from transformers import T5Config, T5EncoderModel

    start = time.perf_counter()
    config = T5Config(**read_config(config_dir, "text_encoder_2"))
    model = _load_dense(lambda: T5EncoderModel(config), path, dtype)
    quantize(model, weights=qint8)
    freeze(model)
    return _loaded("text_encoder_2", path, model, "quanto qint8", start)


def _load_dense(build: Callable[[], torch.nn.Module], path: Path, dtype: torch.dtype) -> torch.nn.Module:
    try:
        state_dict = load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
        raise ModelFileError(f"{path.name} is not a readable safetensors file ({e}). Download it again.") from e
    with torch.device("meta"):
        model = build()
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    buffers = {n for n, _ in model.named_buffers()}
    missing = [k for k in result.missing_keys if k not in buffers and k != "encoder.embed_tokens.weight"]
    if missing or result.unexpected_keys:
        raise ModelFileError(
            f"{path.name} does not fit {type(model).__name__}: {len(missing)} missing tensors (e.g. {missing[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]}). Is it the right file?"
        )
    _materialize_meta_buffers(model, build)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if any(p.dtype != dtype for p in model.parameters()):  # a no-op .to() still makes diffusers warn
        model.to(dtype)
    return model.eval().requires_grad_(False)


def _materialize_meta_buffers(model: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> None:
    # Non-persistent buffers (CLIP's position_ids) are not in the file; rebuild them from a real, empty model.
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if not meta:
        return
    fresh = dict(build().named_buffers())
    for name in meta:
        module_name, _, buf = name.rpartition(".")
        model.get_submodule(module_name)._buffers[buf] = fresh[name]


def load_clip(path: Path, config_dir: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, LoadSummary]:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**read_config(config_dir, "text_encoder"))
    return _timed_dense("text_encoder", lambda: CLIPTextModel(config), path, dtype)


def load_vae(path: Path, config_dir: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, LoadSummary]:
    from diffusers import AutoencoderKL

    config = read_config(config_dir, "vae")
    return _timed_dense("vae", lambda: AutoencoderKL.from_config(config), path, dtype)


def _timed_dense(
    component: str, build: Callable[[], torch.nn.Module], path: Path, dtype: torch.dtype
) -> tuple[torch.nn.Module, LoadSummary]:
    start = time.perf_counter()
    model = _load_dense(build, path, dtype)
    return _loaded(component, path, model, str(dtype).removeprefix("torch."), start)


def load_tokenizers(clip_dir: Path, t5_dir: Path):
    """CLIP's tokenizer (padded to 77) and T5's (up to 512 tokens), from local folders."""
    from transformers import CLIPTokenizer, T5Tokenizer

    try:
        return CLIPTokenizer.from_pretrained(clip_dir), T5Tokenizer.from_pretrained(t5_dir)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"Could not read the tokenizers in {clip_dir} / {t5_dir} ({e}).") from e
