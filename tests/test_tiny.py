"""The tiny model kit: deterministic, complete, and its GGUF files hold the same model as its safetensors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig
from diffusers.models.model_loading_utils import load_gguf_checkpoint
from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor
from helpers import START_S
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from fluxdemo.model import tiny
from fluxdemo.model.loading import load_transformer
from fluxdemo.model.names import SWAPPED_HALVES, FluxDims, bfl_linear_shapes, fused_map, linear_map, norm_map
from fluxdemo.model.presets import get_preset

TEXTS = ["a cat", "a photo of a dog in the snow", "A Photo of a DOG, 42 zebras!", "héllo wörld ☃", ""]
Q8_0, Q4_0 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(kit: Path) -> dict:
    return json.loads((kit / "kit.json").read_text())


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _gguf_field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _bfl_to_diffusers(bfl: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The inverse of tiny.to_bfl_state_dict, written independently from the flux_names tables."""
    dims = FluxDims.from_config(config)
    out = {}
    for bfl_name, name in linear_map(dims).items():
        for p in ("weight", "bias"):
            tensor = bfl[f"{bfl_name}.{p}"]
            if bfl_name in SWAPPED_HALVES:
                shift, scale = tensor.chunk(2)
                tensor = torch.cat([scale, shift])
            out[f"{name}.{p}"] = tensor
    for bfl_name, fused in fused_map(dims).items():
        for p in ("weight", "bias"):
            parts = bfl[f"{bfl_name}.{p}"].split([rows for _, rows in fused.parts])
            out.update({f"{name}.{p}": part for (name, _), part in zip(fused.parts, parts, strict=True)})
    for bfl_name, name in norm_map(dims).items():
        out[name] = bfl[bfl_name]
    return out


# --- layout and determinism ----------------------------------------------------------------------------------------


def test_kit_layout_matches_manifest_and_presets(tiny_kit: Path):
    manifest = _manifest(tiny_kit)
    assert (manifest["kind"], manifest["version"], manifest["seed"]) == ("tiny", tiny.KIT_VERSION, 0)
    assert manifest["transformer_config"] == tiny.TINY_TRANSFORMER
    on_disk = {p.relative_to(tiny_kit).as_posix() for p in tiny_kit.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"kit.json"}
    for rel, digest in manifest["files"].items():
        assert _sha256(tiny_kit / rel) == digest, rel
    for name, source in get_preset("tiny", use_env=False).sources().items():
        assert (tiny_kit / source.path).exists(), (name, source.path)
    assert {"gguf/flux1-tiny-Q8_0.gguf", "gguf/flux1-tiny-Q4_0.gguf", "model_index.json"} <= on_disk


def test_build_is_identical_in_a_fresh_process_and_tokenizers_reload_there(tiny_kit: Path, tmp_path: Path):
    """One subprocess checks two things: a second build gives the same bytes, and the saved tokenizers reload."""
    script = textwrap.dedent(
        """
        import json, sys
        from transformers import AutoTokenizer, CLIPTokenizer, T5Tokenizer
        from fluxdemo.model.tiny import build_kit

        kit, out, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        build_kit(out, "tiny", seed=0)
        ids = {}
        for name, cls in (("auto", AutoTokenizer), ("clip", CLIPTokenizer)):
            ids[name] = [cls.from_pretrained(kit + "/tokenizer")(t).input_ids for t in texts]
        for name, cls in (("auto_2", AutoTokenizer), ("t5", T5Tokenizer)):
            ids[name] = [cls.from_pretrained(kit + "/tokenizer_2")(t).input_ids for t in texts]
        print(json.dumps(ids))
        """
    )
    out = tmp_path / "again"
    cmd = [sys.executable, "-c", script, str(tiny_kit), str(out), json.dumps(TEXTS)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=START_S)
    ids = json.loads(result.stdout.strip().splitlines()[-1])

    assert (out / "kit.json").read_bytes() == (tiny_kit / "kit.json").read_bytes()
    for rel, digest in _manifest(tiny_kit)["files"].items():
        assert _sha256(out / rel) == digest, rel
    clip, t5 = tiny._make_clip_tokenizer(), tiny._make_t5_tokenizer()
    assert ids["auto"] == ids["clip"] == [clip(t).input_ids for t in TEXTS]
    assert ids["auto_2"] == ids["t5"] == [t5(t).input_ids for t in TEXTS]


def test_seed_changes_weights_only(tiny_kit: Path, tmp_path: Path):
    other = _manifest(tiny.build_kit(tmp_path / "seed1", "tiny", seed=1))["files"]
    base = _manifest(tiny_kit)["files"]
    changed = {rel for rel in base if base[rel] != other[rel]}
    assert changed == {rel for rel in base if rel.endswith((".safetensors", ".gguf"))}


def test_build_kit_refuses_a_non_empty_folder_and_unknown_kinds(tmp_path: Path):
    (tmp_path / "stray.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        tiny.build_kit(tmp_path)
    with pytest.raises(ValueError, match="tiny-wide"):
        tiny.build_kit(tmp_path / "new", kind="huge")


def test_ensure_kit_reuses_the_cache_and_keeps_the_winner_of_a_race(tmp_path: Path, monkeypatch):
    real_build = tiny.build_kit
    winner = tmp_path / f"tiny-v{tiny.KIT_VERSION}"

    def build_and_lose_the_race(out: Path, kind: str = "tiny", seed: int = 0) -> Path:
        real_build(out, kind, seed)
        real_build(winner, kind, seed)  # another process renames its kit into place first
        return out

    monkeypatch.setattr(tiny, "build_kit", build_and_lose_the_race)
    assert tiny.ensure_kit("tiny", cache_dir=tmp_path) == winner
    assert [p.name for p in tmp_path.iterdir()] == [winner.name]  # our staging copy is gone

    stamp = (winner / "kit.json").stat().st_mtime_ns
    monkeypatch.setattr(tiny, "build_kit", None)  # a second call must not build
    assert tiny.ensure_kit("tiny", cache_dir=tmp_path) == winner
    assert (winner / "kit.json").stat().st_mtime_ns == stamp


def test_ensure_kit_refuses_a_damaged_kit(tmp_path: Path):
    damaged = tmp_path / f"tiny-v{tiny.KIT_VERSION}"
    damaged.mkdir()
    (damaged / "model_index.json").write_text("{}")
    with pytest.raises(RuntimeError, match="delete it"):
        tiny.ensure_kit("tiny", cache_dir=tmp_path)


def test_kit_cache_dir_follows_fluxdemo_cache(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("FLUXDEMO_CACHE", str(tmp_path))
    assert tiny.kit_cache_dir() == tmp_path / "kits"
    monkeypatch.delenv("FLUXDEMO_CACHE")
    assert tiny.kit_cache_dir() == Path.home() / ".cache" / "fluxdemo" / "kits"


# --- the diffusers folder -------------------------------------------------------------------------------------------


def test_plain_diffusers_pipeline_makes_images_that_depend_on_prompt_and_seed(tiny_kit: Path):
    pipe = FluxPipeline.from_pretrained(tiny_kit, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def image(prompt: str, seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        out = pipe(prompt, num_inference_steps=2, height=32, width=32, generator=generator)
        return np.asarray(out.images[0], dtype=np.float64)

    cat, dog, cat_seed1 = image("a cat", 0), image("a photo of a dog in the snow", 0), image("a cat", 1)
    assert cat.shape == (32, 32, 3)
    assert cat.std() > 10  # not a flat colour (pixel values 0..255)
    assert np.abs(cat - dog).mean() > 5  # visibly different prompts
    assert np.abs(cat - cat_seed1).mean() > 5
    assert np.array_equal(cat, image("a cat", 0))


# --- tokenizers ----------------------------------------------------------------------------------------------------


def test_tokenizers_reload_identically_and_clip_pads_to_77(tiny_kit: Path):
    clip = CLIPTokenizer.from_pretrained(tiny_kit / "tokenizer")
    t5 = T5Tokenizer.from_pretrained(tiny_kit / "tokenizer_2")
    assert clip.get_vocab() == tiny._make_clip_tokenizer().get_vocab()
    assert t5.get_vocab() == tiny._make_t5_tokenizer().get_vocab()
    assert (clip.model_max_length, t5.model_max_length) == (77, 512)
    assert len(clip) == tiny.TINY_CLIP["vocab_size"] and len(t5) == tiny.TINY_T5["vocab_size"]

    padded = clip("a cat", padding="max_length", max_length=clip.model_max_length).input_ids
    bos, eos = tiny.TINY_CLIP["bos_token_id"], tiny.TINY_CLIP["eos_token_id"]
    assert len(padded) == 77 and padded[0] == bos and padded[3:] == [eos] * 74
    assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (bos, eos, tiny.TINY_CLIP["pad_token_id"])
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)


def test_every_listed_word_is_one_token():
    clip, t5 = tiny._make_clip_tokenizer(), tiny._make_t5_tokenizer()
    for word in tiny._WORD_LIST:
        assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
        assert len(t5(word, add_special_tokens=False).input_ids) == 1, word
    assert t5.convert_ids_to_tokens(t5("a photo of a dog in the snow").input_ids) == [
        "▁a", "▁photo", "▁of", "▁a", "▁dog", "▁in", "▁the", "▁snow", "</s>"
    ]  # fmt: skip
    assert t5.unk_token_id not in t5("Any ASCII text: {~}, 1+2=3?").input_ids


# --- GGUF files ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("qtype", "max_err"), [(Q8_0, 1e-2), (Q4_0, 0.1)])
def test_transformer_gguf_holds_the_reference_weights(tiny_kit: Path, qtype, max_err):
    path = tiny_kit / "gguf" / f"flux1-tiny-{qtype.name}.gguf"
    reader = gguf.GGUFReader(path)
    assert _gguf_field(reader, "general.architecture") == "flux"
    assert _gguf_field(reader, "general.quantization_version") == 2
    assert _gguf_field(reader, "general.file_type") == tiny._FILE_TYPES[qtype]

    loaded = load_gguf_checkpoint(path)
    dims = FluxDims.from_config(tiny.TINY_TRANSFORMER)
    for module, shape in bfl_linear_shapes(dims).items():  # GGUF's reversed shapes come back in torch order
        assert tuple(dequantize_gguf_tensor(loaded[f"{module}.weight"]).shape) == shape, module
    quantized = {name for name, t in loaded.items() if getattr(t, "quant_type", None) is not None}
    assert quantized == {
        n for n, t in loaded.items() if n.startswith(("double_blocks.", "single_blocks.")) and n.endswith(".weight")
    }
    assert len(quantized) == 10 * dims.num_double + 3 * dims.num_single

    bfl = {name: dequantize_gguf_tensor(t).float() for name, t in loaded.items()}
    converted = _bfl_to_diffusers(bfl, tiny.TINY_TRANSFORMER)
    reference = load_file(tiny_kit / "transformer" / "diffusion_pytorch_model.safetensors")
    assert set(converted) == set(reference)
    origin = {name: bfl_name for bfl_name, names in tiny._bfl_sources(dims).items() for name in names}
    for name, expected in reference.items():
        if origin[name] in quantized:
            assert _rel_err(converted[name], expected) < max_err, name
        else:
            assert torch.equal(converted[name], expected), name


def test_t5_gguf_loads_in_transformers_and_matches_the_reference(tiny_kit: Path):
    name = "t5-v1_1-tiny-encoder-Q8_0.gguf"
    reader = gguf.GGUFReader(tiny_kit / "gguf" / name)
    assert _gguf_field(reader, "general.architecture") == "t5encoder"
    assert _gguf_field(reader, "tokenizer.ggml.model") == "t5"
    assert _gguf_field(reader, "t5encoder.block_count") == tiny.TINY_T5["num_layers"]

    config = T5Config.from_pretrained(tiny_kit / "text_encoder_2")
    quant = T5EncoderModel.from_pretrained(tiny_kit / "gguf", gguf_file=name, config=config).eval()
    reference = T5EncoderModel.from_pretrained(tiny_kit / "text_encoder_2").eval()
    ids = AutoTokenizer.from_pretrained(tiny_kit / "tokenizer_2")(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**ids).last_hidden_state
        actual = quant(**ids).last_hidden_state
    assert _rel_err(actual, expected) < 2e-2

    ref_sd, quant_sd = reference.state_dict(), quant.state_dict()
    for key, expected in ref_sd.items():
        if ".SelfAttention." in key and "relative_attention_bias" not in key or ".DenseReluDense." in key:
            assert _rel_err(quant_sd[key], expected) < 1e-2, key
        else:
            assert torch.equal(quant_sd[key], expected), key  # F32 in the file: embeddings, norms, position bias

    from_gguf = T5Tokenizer.from_pretrained(tiny_kit / "gguf", gguf_file=name)
    assert [from_gguf(t).input_ids for t in TEXTS] == [tiny._make_t5_tokenizer()(t).input_ids for t in TEXTS]


# --- the real-width kit --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_wide_kit_loads_with_diffusers_stock_single_file_loader(tiny_kit: Path, tiny_wide_kit: Path):
    kit = tiny_wide_kit  # the session's build, which the other real-width tests share
    files = _manifest(kit)["files"]
    for name, source in get_preset("tiny-wide", use_env=False).sources().items():
        assert (kit / source.path).exists(), (name, source.path)
    assert "transformer/diffusion_pytorch_model.safetensors" not in files
    tiny_files = _manifest(tiny_kit)["files"]
    for component in ("text_encoder/", "text_encoder_2/", "vae/", "tokenizer/", "tokenizer_2/", "scheduler/"):
        shared = {rel: digest for rel, digest in tiny_files.items() if rel.startswith(component)}
        assert shared and all(files[rel] == digest for rel, digest in shared.items()), component
    assert files["gguf/t5-v1_1-tiny-wide-encoder-Q8_0.gguf"] == tiny_files["gguf/t5-v1_1-tiny-encoder-Q8_0.gguf"]

    # diffusers' own BFL converter (which hard-codes width 3072) must read our file: an independent name check.
    model = FluxTransformer2DModel.from_single_file(
        kit / "gguf" / "flux1-tiny-wide-Q8_0.gguf",
        config=str(kit),
        subfolder="transformer",
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
    )
    reference = tiny._make_transformer("tiny-wide", seed=0).state_dict()
    loaded = model.state_dict()
    assert set(loaded) == set(reference)
    for name, expected in reference.items():
        actual = loaded[name]
        if hasattr(actual, "quant_type"):
            assert _rel_err(dequantize_gguf_tensor(actual), expected) < 1e-2, name
        else:
            assert torch.equal(actual, expected), name

    # fluxdemo's own width-agnostic loader on the same file: exactly diffusers' result, packed bytes included.
    ours, _ = load_transformer(kit / "gguf" / "flux1-tiny-wide-Q8_0.gguf", kit, torch.float32)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, loaded[name]), name
        assert getattr(tensor, "quant_type", None) == getattr(loaded[name], "quant_type", None), name
