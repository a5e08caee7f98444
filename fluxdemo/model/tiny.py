"""Tiny model kits: random-weight FLUX component sets in the real file formats, built locally with no network.

Every test and `--model tiny` run on a kit instead of the 30 GB of real weights. A kit is small enough to build in
seconds, yet each file has the layout of its real counterpart, so the code under test is the production code:

* a complete diffusers FluxPipeline folder with fp32 safetensors weights (the unquantized reference);
* the transformer as city96-style GGUF files (BFL tensor names, block weights Q8_0 / Q4_0, the rest F32);
* the T5 encoder as a llama.cpp-style GGUF file (T5ENCODER names, tokenizer metadata), as city96 ships T5-XXL;
* hand-built, deterministic CLIP (byte-level BPE) and T5 (Unigram) tokenizers;
* sample LoRAs from `fluxdemo.model.tiny_loras`.

Two kinds: "tiny" (2+2 blocks of width 32, runs in milliseconds) and "tiny-wide" (1+1 blocks at the real width
3072, for code that hard-codes it, such as diffusers' single-file converter; its 2 GB fp32 transformer weights are not
written, only its GGUF). Everything is a pure function of (kind, seed), so two builds give identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import torch

from fluxdemo.model.kits import KINDS as KINDS
from fluxdemo.model.kits import KIT_VERSION as KIT_VERSION
from fluxdemo.model.kits import kit_cache_dir as kit_cache_dir
from fluxdemo.model.kits import kit_folder
from fluxdemo.model.names import SWAPPED_HALVES, FluxDims, fused_map, linear_map, norm_map
from fluxdemo.model.tiny_loras import write_sample_loras

if TYPE_CHECKING:  # diffusers + transformers cost 3 s to import; reusing a built kit (the app's start) needs neither
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

logger = logging.getLogger(__name__)


_SCHEDULER_DIR = Path(__file__).parents[1] / "configs" / "flux1-dev" / "scheduler"

# ---------------------------------------------------------------------------------------------------------------
# Tokenizers. tokenizers' trainers are not deterministic across processes, so both vocabularies are built here by
# plain Python from one word list: the same ids on every machine, and known before anything is imported.
# ---------------------------------------------------------------------------------------------------------------

_WORDS = """
a an the of in on at with and or to from by for under over near behind above below beside between inside outside
is are was be has have this that it its as into through up down out off one two three four five many some no
photo picture image painting drawing sketch portrait render illustration poster close view shot scene style art
cat dog bird fish horse cow sheep lion tiger bear wolf fox rabbit mouse owl eagle duck frog snake deer elephant
man woman person people child boy girl baby face eyes hair hand hands smile king queen knight robot astronaut wizard
tree trees flower flowers grass forest jungle garden leaf leaves rose field meadow mountain mountains hill valley
river lake sea ocean beach wave waves island desert sand rock rocks stone cave sky cloud clouds sun moon star stars
rain snow storm fog mist wind fire smoke ice water light shadow night day morning evening sunset sunrise winter
summer spring autumn city street road bridge house home castle tower church village town building window door wall
room kitchen table chair bed book lamp car train boat ship plane bicycle bus truck rocket space planet galaxy
red orange yellow green blue purple pink brown black white gray grey gold golden silver dark bright colorful
big small tiny huge tall long short old young new ancient modern futuristic beautiful cute happy sad angry calm
wild quiet soft hard warm cold hot wet dry fluffy shiny glowing wooden metal glass paper neon vintage retro
detailed realistic photorealistic cinematic dramatic epic fantasy surreal minimal abstract studio lighting
watercolor oil digital pencil ink anime cartoon comic pixel sculpture statue mosaic wearing holding sitting
standing walking running flying swimming playing sleeping eating reading looking dancing jumping singing riding
made full lot very high quality resolution sharp focus background foreground center top bottom left right side
front back hat coat dress shirt shoes glasses crown sword shield flag map clock coffee tea cup bread cake apple
fruit food pizza music guitar piano camera phone computer screen sign text word letter logo
"""
_WORD_LIST = tuple(dict.fromkeys(_WORDS.split()))  # keeps order, drops repeats

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_EOW = "</w>"  # CLIP's BPE marks the last symbol of each word with this suffix


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table, the base alphabet of byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe(symbols: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges the way `tokenizers` does: always the lowest-ranked pair first, leftmost on ties."""
    symbols = list(symbols)
    while len(symbols) > 1:
        candidates = [(ranks[p], i) for i, p in enumerate(pairwise(symbols)) if p in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocabulary (bytes, bytes+</w>, merges, then the two specials) where every listed word is one token.

    For each word, merges are added until BPE turns it into a single symbol. A new merge always ranks after the
    merges an earlier word used, so it can never change how an earlier word is split.
    """
    byte_chars = _bytes_to_unicode()
    tokens = list(byte_chars.values()) + [c + _EOW for c in byte_chars.values()]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORD_LIST:
        symbols = [byte_chars[b] for b in word.encode()]
        symbols[-1] += _EOW
        while len(symbols := _bpe(symbols, ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if (merged := pair[0] + pair[1]) not in known:
                known.add(merged)
                tokens.append(merged)
    tokens += [_CLIP_BOS, _CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _t5_pieces() -> list[tuple[str, float]]:
    """SentencePiece-style Unigram pieces: <pad>=0, </s>=1, <unk>=2, then words, then single characters.

    Scores are log-probabilities: a whole word (about -5) always beats spelling it out (-11 or -12 per character),
    and the characters make any printable ASCII text tokenize without <unk>.
    """
    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    for i, word in enumerate(_WORD_LIST):
        pieces.setdefault("▁" + word, -5.0 - i / 1000)
        pieces.setdefault("▁" + word.capitalize(), -6.0 - i / 1000)
    pieces.setdefault("▁", -10.0)
    for c in map(chr, range(ord("!"), ord("~") + 1)):
        pieces.setdefault("▁" + c, -11.0)
        pieces.setdefault(c, -12.0)
    return list(pieces.items())


_CLIP_VOCAB, _CLIP_MERGES = _clip_vocab_and_merges()
_T5_PIECES = _t5_pieces()

# ---------------------------------------------------------------------------------------------------------------
# Component configs (constructor kwargs). The constraints that tie them together are in library-facts §2:
# in_channels = 4 * latent_channels, joint_attention_dim = T5 d_model, pooled_projection_dim = CLIP hidden_size,
# sum(axes_dims_rope) = attention_head_dim. Every quantized row length is a multiple of 32 (Q8_0/Q4_0 blocks).
# ---------------------------------------------------------------------------------------------------------------

TINY_TRANSFORMER: dict = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=[4, 6, 6],
)
# The real FLUX.1-dev width and rope axes with one block of each kind; text dims stay tiny to share T5 and CLIP.
WIDE_TRANSFORMER: dict = dict(
    TINY_TRANSFORMER,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,
    axes_dims_rope=[16, 56, 56],
)
TINY_CLIP: dict = dict(
    vocab_size=len(_CLIP_VOCAB),
    hidden_size=32,
    intermediate_size=37,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    # The real ids: CLIP's pooled output is taken at the first eos_token_id (facts §2), and pad is eos, as in FLUX.
    bos_token_id=_CLIP_VOCAB[_CLIP_BOS],
    eos_token_id=_CLIP_VOCAB[_CLIP_EOS],
    pad_token_id=_CLIP_VOCAB[_CLIP_EOS],
)
TINY_T5: dict = dict(
    vocab_size=len(_T5_PIECES),
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",  # T5 v1.1, like FLUX's T5-XXL
    dense_act_fn="gelu_new",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
TINY_VAE: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
_TRANSFORMERS = {"tiny": TINY_TRANSFORMER, "tiny-wide": WIDE_TRANSFORMER}
_CLIP_MAX_LENGTH, _T5_MAX_LENGTH = 77, 512

# Each component draws from its own seed, so adding or resizing one never changes the others' weights, and both
# kinds share identical text encoders and VAE.
_SEED_OFFSETS = {"transformer": 0, "text_encoder": 1, "text_encoder_2": 2, "vae": 3}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown tiny kit kind {kind!r}; choose from {', '.join(KINDS)}.")


# ---------------------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------------------


def _seeded(seed: int, component: str) -> None:
    torch.manual_seed(seed * len(_SEED_OFFSETS) + _SEED_OFFSETS[component])


@torch.no_grad()
def _spread_constants(module: torch.nn.Module) -> None:
    """Give every constant tensor (norm scales of 1, zero biases) a small random spread.

    With all-equal values a norm swapped with its sibling (query/key, attn/ffn) would pass every parity test.
    """
    for param in module.parameters():
        if param.numel() > 1 and bool((param == param.flatten()[0]).all()):
            param.add_(0.1 * torch.randn_like(param))


# Random attention spreads each image token over ~512 mostly-padding T5 tokens, so T5 barely steers a random model;
# a strong pooled (CLIP) path makes the image visibly depend on the prompt (pixel change ~1/255 at gain 1, ~20 at 10).
_POOLED_GAIN = 10.0


@torch.no_grad()
def _make_transformer(kind: str, seed: int) -> FluxTransformer2DModel:
    from diffusers import FluxTransformer2DModel

    _seeded(seed, "transformer")
    model = FluxTransformer2DModel(**_TRANSFORMERS[kind])
    _spread_constants(model)
    model.time_text_embed.text_embedder.linear_1.weight.mul_(_POOLED_GAIN)
    return model.eval()


def _make_clip(seed: int) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded(seed, "text_encoder")
    model = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    _spread_constants(model)
    return model.eval()


def _make_t5(seed: int) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    _seeded(seed, "text_encoder_2")
    model = T5EncoderModel(T5Config(**TINY_T5))
    _spread_constants(model)
    return model.eval()


def _make_vae(seed: int) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    _seeded(seed, "vae")
    model = AutoencoderKL(**TINY_VAE)
    _spread_constants(model)
    return model.eval()


def _make_clip_tokenizer() -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_CLIP_VOCAB, merges=_CLIP_MERGES, model_max_length=_CLIP_MAX_LENGTH)


def _make_t5_tokenizer() -> T5Tokenizer:
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_T5_PIECES, extra_ids=0, model_max_length=_T5_MAX_LENGTH)


# ---------------------------------------------------------------------------------------------------------------
# Transformer GGUF (city96 layout)
# ---------------------------------------------------------------------------------------------------------------


def _bfl_sources(dims: FluxDims) -> dict[str, tuple[str, ...]]:
    """BFL tensor name -> the diffusers tensors whose rows it concatenates, in order."""
    sources: dict[str, tuple[str, ...]] = {}
    for bfl, name in linear_map(dims).items():
        for p in ("weight", "bias"):
            sources[f"{bfl}.{p}"] = (f"{name}.{p}",)
    for bfl, fused in fused_map(dims).items():
        for p in ("weight", "bias"):
            sources[f"{bfl}.{p}"] = tuple(f"{name}.{p}" for name, _ in fused.parts)
    for bfl, name in norm_map(dims).items():
        sources[bfl] = (name,)
    return sources


def to_bfl_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield a diffusers FluxTransformer2DModel state dict as BFL-named tensors, sorted by name.

    One tensor at a time, so converting the real-width model never holds a second copy of it. The inverse of what
    diffusers' single-file loader does, for any width.
    """
    sources = _bfl_sources(FluxDims.from_config(dict(config)))
    used = {name for names in sources.values() for name in names}
    if used != set(state_dict):
        raise ValueError(
            f"State dict does not match the FLUX layout: missing {sorted(used - set(state_dict))[:5]}, "
            f"unmapped {sorted(set(state_dict) - used)[:5]}"
        )
    for bfl in sorted(sources):
        tensor = torch.cat([state_dict[name] for name in sources[bfl]])
        if bfl.rsplit(".", 1)[0] in SWAPPED_HALVES:
            tensor = torch.cat(tensor.chunk(2)[::-1])
        yield bfl, tensor


_FILE_TYPES = {
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
}


def _add_tensor(
    writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType | None
) -> None:
    """Add one tensor, quantized to qtype or kept F32. gguf-py takes torch (row-major) order and reverses the shape."""
    data = tensor.detach().to(torch.float32).numpy()
    if qtype is None:
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _new_writer(arch: str, qtype: gguf.GGMLQuantizationType) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_FILE_TYPES[qtype])
    return writer


def _finish(writer: gguf.GGUFWriter, path: Path) -> None:
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_transformer_gguf(path: Path, model: FluxTransformer2DModel, qtype: gguf.GGMLQuantizationType) -> None:
    """Like city96's files: only the 2-D weights inside double/single blocks are quantized, the rest stays F32."""
    writer = _new_writer("flux", qtype)
    for name, tensor in to_bfl_state_dict(model.state_dict(), model.config):
        in_block = name.startswith(("double_blocks.", "single_blocks."))
        quantize = in_block and name.endswith(".weight") and tensor.ndim == 2
        _add_tensor(writer, name, tensor, qtype if quantize else None)
    _finish(writer, path)


# ---------------------------------------------------------------------------------------------------------------
# T5 encoder GGUF (llama.cpp T5ENCODER layout, as convert_hf_to_gguf.py writes it)
# ---------------------------------------------------------------------------------------------------------------


def _write_t5_gguf(path: Path, model: T5EncoderModel, qtype: gguf.GGMLQuantizationType) -> None:
    cfg = model.config
    writer = _new_writer("t5encoder", qtype)
    writer.add_name("t5-v1_1-tiny-encoder")  # transformers looks for "umt5" here to pick the architecture
    writer.add_context_length(_T5_MAX_LENGTH)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.num_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_key_length(cfg.d_kv)
    writer.add_value_length(cfg.d_kv)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(cfg.relative_attention_num_buckets)
    # transformers takes vocab_size from the token list; without it the embedding is rejected as mismatched.
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([piece for piece, _ in _T5_PIECES])
    writer.add_token_scores([score for _, score in _T5_PIECES])
    token_types = {"<pad>": gguf.TokenType.CONTROL, "</s>": gguf.TokenType.CONTROL, "<unk>": gguf.TokenType.UNKNOWN}
    writer.add_token_types([token_types.get(piece, gguf.TokenType.NORMAL) for piece, _ in _T5_PIECES])
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(True)
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, cfg.num_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "encoder.embed_tokens.weight":
            continue  # a tied alias of shared.weight; llama.cpp stores the embedding once
        module, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(module)}.{suffix}"
        quantize = name.startswith("enc.blk.") and tensor.ndim == 2 and ".attn_rel_b." not in name
        _add_tensor(writer, name, tensor, qtype if quantize else None)
    _finish(writer, path)


# ---------------------------------------------------------------------------------------------------------------
# The kit
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def _no_transformers_progress_bars() -> Iterator[None]:
    """Saving a 200 KB model should not draw progress bars in the CLI's output."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _write_pipeline_folder(out: Path, pipe: FluxPipeline, with_transformer_weights: bool) -> None:
    """A diffusers FluxPipeline folder, component by component so the transformer's weights can be left out."""
    with _no_transformers_progress_bars():
        for name in ("scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae"):
            getattr(pipe, name).save_pretrained(out / name)
    if with_transformer_weights:
        pipe.transformer.save_pretrained(out / "transformer")
    else:
        pipe.transformer.save_config(out / "transformer")
    pipe.save_config(out)  # model_index.json


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(out: Path, kind: str, seed: int) -> None:
    files = {p.relative_to(out).as_posix(): _sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {
        "kind": kind,
        "version": KIT_VERSION,
        "seed": seed,
        "files": files,
        "transformer_config": _TRANSFORMERS[kind],
    }
    (out / "kit.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def build_kit(out: Path, kind: str = "tiny", seed: int = 0) -> Path:
    """Write a complete kit of `kind` into `out` (which must not exist or be empty) and return `out`.

    kit.json is written last: its presence means the kit is complete.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    _check_kind(kind)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"Cannot build a tiny kit into {out}: the folder is not empty.")
    out.mkdir(parents=True, exist_ok=True)

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(_SCHEDULER_DIR),
        text_encoder=_make_clip(seed),
        tokenizer=_make_clip_tokenizer(),
        text_encoder_2=_make_t5(seed),
        tokenizer_2=_make_t5_tokenizer(),
        vae=_make_vae(seed),
        transformer=_make_transformer(kind, seed),
    )
    # The real-width transformer is 2 GB in fp32: the GGUF is the only copy a test of it needs.
    _write_pipeline_folder(out, pipe, with_transformer_weights=kind == "tiny")

    (out / "gguf").mkdir()
    Q8_0, Q4_0 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    _write_transformer_gguf(out / "gguf" / f"flux1-{kind}-Q8_0.gguf", pipe.transformer, Q8_0)
    if kind == "tiny":  # at real width Q4_0 would only add build time and 300 MB
        _write_transformer_gguf(out / "gguf" / f"flux1-{kind}-Q4_0.gguf", pipe.transformer, Q4_0)
    _write_t5_gguf(out / "gguf" / f"t5-v1_1-{kind}-encoder-Q8_0.gguf", pipe.text_encoder_2, Q8_0)

    write_sample_loras(out / "loras", dict(_TRANSFORMERS[kind]), dict(TINY_CLIP), seed)
    _write_manifest(out, kind, seed)
    return out


def _is_complete(kit: Path, kind: str) -> bool:
    try:
        manifest = json.loads((kit / "kit.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("kind") != kind or manifest.get("version") != KIT_VERSION:
        return False
    return all((kit / rel).is_file() for rel in manifest.get("files", {}))


def ensure_kit(kind: str = "tiny", cache_dir: Path | None = None) -> Path:
    """The kit of `kind` in the cache (kit_cache_dir() unless given), built on first use; safe across processes."""
    _check_kind(kind)
    kit = kit_folder(kind, cache_dir)
    root = kit.parent
    if _is_complete(kit, kind):
        logger.debug("tiny kit %r: reusing %s", kind, kit)  # asked once per file resolved: -v only
        return kit
    if kit.exists() and any(kit.iterdir()):
        raise RuntimeError(
            f"{kit} exists but is not a complete '{kind}' kit (no valid kit.json); delete it and retry."
        )

    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Build beside the final place and rename it in: a kit is either complete or absent, even if we are killed.
    staging = Path(tempfile.mkdtemp(prefix=f".{kit.name}-", dir=root))
    try:
        build_kit(staging, kind)
        try:
            os.rename(staging, kit)
        except OSError:
            if not _is_complete(kit, kind):
                raise
            # Another process finished first: keep theirs, ours is removed below.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("tiny kit %r: built %s in %.1f s", kind, kit, time.perf_counter() - start)
    return kit
