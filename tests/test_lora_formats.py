"""LoRA files: every format converts exactly (tiny and real width), wrong-model and broken files get their own message,
and the LoRA folder and uploads never open what they should not."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import lora_factory as lf
import pytest
import torch
from lora_factory import CLIP, TINY, WIDE, comfy_save, pairs_for

from fluxdemo.errors import LoraError
from fluxdemo.lora import (
    LoraLibrary,
    convert,
    inspect_lora,
    lycoris,
    read_safetensors_header,
    save_upload,
    to_diffusers,
)
from fluxdemo.lora import verdict as lora_formats
from fluxdemo.lora.report import flux_dev_dims
from fluxdemo.model.tiny import TINY_TRANSFORMER
from fluxdemo.model.tiny_loras import FORMATS, Pair, canonical_pairs, write_lora, write_sample_loras

STRENGTH = 0.7
FORMAT_NAMES = {
    "peft": "peft",
    "kohya": "kohya",
    "comfy": "comfyui",
    "bfl": "bfl",
    "fal": "fal-kontext",
    "xlabs": "xlabs",
}


@functools.cache
def base_weight(out: int, inp: int) -> torch.Tensor:
    """A plain random weight per shape, made once: at real width a weight is up to 150 MB."""
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(out * 7919 + inp))


@pytest.fixture(scope="module", autouse=True)
def _free_base_weights():
    yield
    base_weight.cache_clear()  # about 300 MB of real-width weights; the rest of the session does not need them


def dense(part: lycoris.FactoredPart) -> torch.Tensor:
    """A factored part's delta rows, read off its forward on the identity (what the layer adds to W @ x)."""
    with torch.no_grad():
        return lycoris._Factors(part)(torch.eye(part.in_features, dtype=torch.float64)).T.float()


def assert_exact(converted, pairs: dict[str, Pair]) -> None:
    """Merged weights (W + s * B @ A from the converted LoRA) equal the hand reference from the canonical pairs."""
    assert set(converted.transformer) | set(converted.text_encoder) == {
        f"{m}.lora_{x}.weight" for m in pairs for x in "AB"
    }
    for module, p in pairs.items():  # one module at a time, to keep memory flat
        weights = {module: base_weight(p.up.shape[0], p.down.shape[1])}
        got = lf.reference_merge(weights, converted, STRENGTH)[module]
        want = lf.expected_merge(weights, pairs, STRENGTH)[module]
        assert lf.relative_error(got, want) < 1e-6, module


@pytest.mark.parametrize("dims", [TINY, WIDE], ids=["tiny", "wide"])
@pytest.mark.parametrize("fmt", list(FORMAT_NAMES))
def test_every_format_converts_exactly(tmp_path, fmt, dims):
    pairs = pairs_for(fmt, dims)
    path = write_lora(tmp_path / f"{fmt}.safetensors", fmt, pairs, dims)
    report = inspect_lora(path, dims, clip_config=CLIP)
    assert report.format == FORMAT_NAMES[fmt] and report.compatible, report.problems
    assert report.unmatched == [] and report.matched == sorted(read_safetensors_header(path).keys() - {"__metadata__"})
    assert report.targets == len(pairs) == sum(report.modules.values())
    assert report.text_encoder == (fmt != "xlabs")
    converted = to_diffusers(path, dims, CLIP)
    assert converted.report == report
    assert_exact(converted, pairs)


def test_kohya_qkv_and_linear1_share_one_down_and_fold_alpha(tmp_path):
    pairs = canonical_pairs(TINY, rank=3, seed=5, alphas=(1.5,), modules=lambda b: b == "single_blocks.1.linear1")
    converted = to_diffusers(write_lora(tmp_path / "k.safetensors", "kohya", pairs, TINY), TINY, CLIP)
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    downs = [converted.transformer[f"transformer.single_transformer_blocks.1.{p}.lora_A.weight"] for p in parts]
    assert all(torch.equal(d, downs[0]) for d in downs)
    up = converted.transformer["transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight"]
    assert up.shape == (TINY.mlp, 3)
    assert torch.allclose(up, pairs["transformer.single_transformer_blocks.1.proj_mlp"].up * 0.5)  # alpha 1.5 / rank 3
    assert converted.report.rank == 3 and converted.report.alpha == 1.5 and converted.report.scale == 0.5


def _peft_key(key: str) -> str:
    """diffusers' kohya text-encoder names (to_q_lora.down, fc1.lora_linear_layer.up) and bare keys, as ours."""
    key = re.sub(r"\.to_(q|k|v)_lora\.", r".\1_proj.lora.", key).replace(".to_out_lora.", ".out_proj.lora.")
    key = (
        key.replace(".lora_linear_layer.", ".lora.")
        .replace(".lora.down.", ".lora_A.")
        .replace(".lora.up.", ".lora_B.")
    )
    return key if key.startswith(("transformer.", "text_encoder.")) else f"transformer.{key}"


def test_real_width_files_agree_with_diffusers_own_converters(tmp_path):
    """An independent check of the naming: diffusers converts real-width kohya, ComfyUI and XLabs files itself."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    pairs = pairs_for("kohya", WIDE, seed=3)
    # diffusers drops kohya alphas on final_layer modules ("TODO: alphas" in its converter): compare those at scale 1.
    pairs = {k: dataclasses.replace(p, alpha=None) if "norm_out" in k else p for k, p in pairs.items()}
    for fmt, fmt_pairs in (("kohya", pairs), ("comfy", pairs), ("xlabs", pairs_for("xlabs", WIDE))):
        path = write_lora(tmp_path / f"{fmt}.safetensors", fmt, fmt_pairs, WIDE)
        ours = to_diffusers(path, WIDE, CLIP)
        ours = {**ours.transformer, **ours.text_encoder}
        theirs = {_peft_key(k): v for k, v in FluxLoraLoaderMixin.lora_state_dict(str(path)).items()}
        assert set(theirs) == set(ours), fmt
        for key in (k for k in ours if k.endswith("lora_A.weight")):
            up = key.replace("lora_A", "lora_B")
            assert lf.relative_error(ours[up] @ ours[key], theirs[up] @ theirs[key]) < 1e-6, (fmt, key)


def test_converted_weights_load_into_diffusers_at_scale_one(tmp_path):
    """The contract with the apply step: load_lora_adapter + set_adapters(weight=s) gives W + s * B @ A exactly,
    with mixed ranks (a LoHa's rank r*r beside rank-3 LoRAs) and no alpha passed."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_TRANSFORMER).eval()
    base = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    pairs = canonical_pairs(TINY, rank=3, seed=1, alphas=(None, 1.0, 6.0), modules=lambda b: b != "txt_in")
    tensors, _ = FORMATS["kohya"](pairs, TINY)
    hada = lf.loha((TINY.inner, TINY.joint_attention_dim), 3, torch.Generator().manual_seed(2))
    tensors |= {f"lora_unet_txt_in.{role}": t for role, t in hada.items()} | {
        "lora_unet_txt_in.alpha": torch.tensor(2.0)
    }
    converted = to_diffusers(tensors, TINY)
    model.load_lora_adapter(converted.transformer, prefix="transformer", adapter_name="x")
    lycoris.attach(model, converted.factored["transformer"], "x")  # the LoHa, kept factored
    model.set_adapters(["x"], weights=[STRENGTH])
    adapted = [
        (n, m)
        for n, m in model.named_modules()
        if "x" in getattr(m, "lora_A", {}) or "x" in getattr(m, "lycoris_factors", {})
    ]
    assert len(adapted) == len(pairs) + 1
    for name, module in adapted:
        with torch.no_grad():  # the layer's effective weight: its output on the identity, less the bias
            eye = torch.eye(module.get_base_layer().in_features)
            effective = (module(eye) - module.get_base_layer().bias).T
        if name == "context_embedder":
            want = base[name] + STRENGTH * lf.loha_delta(hada, 2.0).float()
        else:
            want = lf.expected_merge({f"transformer.{name}": base[name]}, pairs, STRENGTH)[f"transformer.{name}"]
        assert lf.relative_error(effective, want) < 1e-6, name


def test_diffusers_names_in_kohya_and_lycoris_spelling(tmp_path):
    """`lora_transformer_` (kohya-style) and `lycoris_` (LyCORIS wrappers) keys: diffusers names, underscored."""
    pairs = canonical_pairs(TINY, rank=2, seed=4, alphas=(2.0,), modules=lambda b: b.startswith("single_blocks.1."))
    tensors = {}
    for module, p in pairs.items():
        name = "lora_transformer_" + module.removeprefix("transformer.").replace(".", "_")
        tensors |= {
            f"{name}.lora_down.weight": p.down,
            f"{name}.lora_up.weight": p.up,
            f"{name}.alpha": torch.tensor(2.0),
        }
    lokr = lf.lokr((TINY.inner, TINY.inner), (2, 2), 2, None, torch.Generator().manual_seed(5))
    tensors |= {f"lycoris_transformer_blocks_0_attn_to_out_0.{role}": t for role, t in lokr.items()}
    converted = to_diffusers(lf.save(tmp_path / "mixed.safetensors", tensors), TINY)
    assert converted.report.compatible and converted.report.naming == "kohya-diffusers"
    assert_exact(converted, pairs)
    (part,) = converted.factored["transformer"]
    assert part.module == "transformer_blocks.0.attn.to_out.0"
    assert lf.relative_error(dense(part), lf.lokr_delta(lokr, None)) < 1e-6


def test_real_flux_dev_counts(tmp_path):
    """A real-width file (blocks 0 only) inspected against FLUX.1-dev itself (the default dims)."""
    blocks = lambda b: b.startswith(("double_blocks.0.", "single_blocks.0.")) or b in ("img_in", "final_layer.linear")  # noqa: E731
    pairs = canonical_pairs(WIDE, rank=1, seed=2, modules=blocks)
    report = inspect_lora(write_lora(tmp_path / "real.safetensors", "kohya", pairs, WIDE))
    assert report.compatible, report.problems
    # img + txt: mod, qkv (3), proj, mlp.0, mlp.2 = 7 each; single: modulation, linear1 (4), linear2 = 6.
    assert report.modules == {"double_blocks": 14, "single_blocks": 6, "embedders": 1, "final_layer": 1}
    assert report.targets == 22 and len(report.matched) == 2 * 15 and report.unmatched == []


@pytest.mark.parametrize("dims", [TINY, WIDE], ids=["tiny", "wide"])
def test_lycoris_lokr_and_loha_are_exact(tmp_path, dims):
    g = torch.Generator().manual_seed(7)
    d, m = dims.inner, dims.mlp
    specs = {  # BFL module -> (naming prefix, kind tensors, alpha)
        "double_blocks.0.img_attn.qkv": (
            "lora_unet_double_blocks_0_img_attn_qkv",
            lf.lokr((3 * d, d), (4, 4), 2, None, g),
            3.0,
        ),
        "double_blocks.0.txt_attn.proj": ("lora_unet_double_blocks_0_txt_attn_proj", lf.loha((d, d), 2, g), 1.0),
        "final_layer.adaLN_modulation.1": (
            "lora_unet_final_layer_adaLN_modulation_1",
            lf.lokr((2 * d, d), (2, 4), 1, 2, g),
            2.0,
        ),
    }
    if dims == TINY:  # at real width these two would need GB-sized dense references in the test
        # both LoKr factors full: no alpha scaling in LyCORIS
        specs["single_blocks.0.linear1"] = (
            "diffusion_model.single_blocks.0.linear1",
            lf.lokr((3 * d + m, d), (2, 2), None, None, g),
            5.0,
        )
        # rank 8 * 8 > in_features 32: stored as the dense delta against an identity, still exact
        specs["txt_in"] = ("lora_unet_txt_in", lf.loha((d, dims.joint_attention_dim), 8, g), 4.0)
    tensors = {f"{prefix}.{role}": t for prefix, kind, _ in specs.values() for role, t in kind.items()}
    tensors |= {f"{prefix}.alpha": torch.tensor(alpha) for prefix, _, alpha in specs.values()}
    path = lf.save(tmp_path / "lycoris.safetensors", tensors)
    report = inspect_lora(path, dims, clip_config=CLIP)
    assert report.compatible and report.format == "lycoris-lokr" and not report.unmatched, report.problems
    converted = to_diffusers(path, dims, CLIP)
    parts = {f"transformer.{p.module}": p for p in converted.factored["transformer"]}
    # Nothing dense is kept: the factors are the file's own tensors, shared by the parts of a fused module.
    kept = {id(t): t.numel() * t.element_size() for p in parts.values() for t in p.tensors.values()}
    assert sum(kept.values()) == sum(
        t.numel() * t.element_size() for _, kind, _ in specs.values() for t in kind.values()
    )
    for bfl, (_, kind, alpha) in specs.items():
        delta = lf.lokr_delta(kind, alpha) if "lokr_w1" in kind or "lokr_w1_a" in kind else lf.loha_delta(kind, alpha)
        for module, want in lf.split_delta(bfl, delta, dims).items():
            assert lf.relative_error(dense(parts.pop(module)), want.float()) < 1e-6, module
    assert parts == {}


def test_full_deltas_over_budget_are_refused(tmp_path, monkeypatch):
    t = {"lora_unet_double_blocks_0_img_attn_proj.diff": torch.ones(TINY.inner, TINY.inner)}
    monkeypatch.setattr(lora_formats, "DENSE_MAX_BYTES", 1000)
    report = inspect_lora(lf.save(tmp_path / "full.safetensors", t), TINY, clip_config=CLIP)
    assert not report.compatible and "a whole-model full delta is not supported" in report.problems[0]


@pytest.mark.parametrize(
    "build, message",
    [
        (lf.sdxl_kohya, r"an SDXL LoRA \(kohya naming: lora_unet_down_blocks_1_.*\), not FLUX"),
        (lf.sdxl_diffusers, r"an SDXL LoRA \(diffusers naming: unet\.down_blocks.*\), not FLUX"),
        (lf.sd15_kohya, r"an SD1\.5 LoRA \(kohya naming"),
        (lambda p: lf.control_lora(p, flux_dev_dims()), r"a FLUX\.1 Canny/Depth control LoRA \(img_in takes 128"),
        (lambda p: lf.control_lora(p, flux_dev_dims(), 384), r"a FLUX\.1 Fill LoRA \(img_in takes 384"),
        (lf.no_lora, r"no LoRA weights in this file \(2 tensors, none named like a LoRA"),
        (
            lambda p: write_lora(p, "kohya", pairs_for("kohya", TINY), TINY),
            r"made for a model of width 32, but FLUX\.1-dev has width 3072",
        ),
    ],
    ids=["sdxl-kohya", "sdxl-diffusers", "sd15", "control", "fill", "no-lora", "width"],
)
def test_wrong_model_files_are_named(tmp_path, build, message):
    path = build(tmp_path / "x.safetensors")
    report = inspect_lora(path)
    assert not report.compatible and re.search(message, report.problems[0]), report.problems
    with pytest.raises(LoraError, match=message):
        to_diffusers(path, flux_dev_dims())


def test_blocks_the_model_lacks_are_unmatched_with_the_reason(tmp_path):
    pairs = canonical_pairs(TINY, rank=2, modules=lambda b: b.startswith(("double_blocks.1.", "single_blocks.0.")))
    path = write_lora(tmp_path / "more-blocks.safetensors", "kohya", pairs, TINY)
    one_block = dataclasses.replace(TINY, num_double=1)
    report = inspect_lora(path, one_block, clip_config=CLIP)
    assert not report.compatible and all(k.startswith("lora_unet_double_blocks_1_") for k in report.unmatched)
    assert (
        "double_blocks.1.img_attn.qkv: this model has no such module (1 double + 2 single blocks)"
        in report.problems[0]
    )
    assert report.modules == {"single_blocks": 6}


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda p: p.write_bytes(b""), r"only 0 bytes, less than the 8-byte header length"),
        (
            lambda p: p.write_bytes(write_lora(p, "kohya", pairs_for("kohya", TINY), TINY).read_bytes()[:-100]),
            r"tensor '.*' ends at byte \d+ of a \d+-byte data section \(truncated file\)",
        ),
        (
            lambda p: p.write_bytes((10**6).to_bytes(8, "little") + b"{}"),
            r"header claims 1000000 bytes but the file has 10",
        ),
        (
            lambda p: lf.raw(p, {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, bytes(32)),
            r"its header lies about sizes: 'w' is F32 \[4, 4\] = 64 bytes, but its data_offsets \[0, 32\] span 32",
        ),
        (
            lambda p: lf.raw(
                p,
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                bytes(12),
            ),
            r"overlaps",
        ),
        (
            lambda p: lf.raw(p, {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, bytes(1)),
            r"unknown dtype",
        ),
        (
            lambda p: lf.raw(p, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(9)),
            r"5 bytes follow the last tensor",
        ),
        (lambda p: p.write_bytes((5).to_bytes(8, "little") + b"{nope"), r"not valid UTF-8 JSON"),
        (lf.pickled, r"is a pickle/PyTorch checkpoint, not safetensors; it was not opened"),
        (lf.torch_zip, r"is a pickle/PyTorch checkpoint, not safetensors"),
        (lambda p: p.write_bytes(b"<!DOCTYPE html><html>login</html>"), r"an HTML/XML page"),
        (
            lambda p: p.write_text("trigger: ohwx\nTrained 2000 steps on my dog.\n" * 40),
            r"bad.safetensors is a text file \(it begins 'trigger: ohwx\\nTrained 20'\), not a safetensors file",
        ),
        (
            lambda p: p.write_bytes(bytes(range(200, 256)) * 4),
            r"is binary data of an unknown kind, not a safetensors file",
        ),
    ],
    ids=[
        "empty",
        "truncated",
        "short-header",
        "lying-sizes",
        "overlap",
        "dtype",
        "trailing",
        "json",
        "pickle",
        "torch-zip",
        "html",
        "text",
        "binary",
    ],
)
def test_unreadable_files_say_why(tmp_path, build, message):
    path = tmp_path / "bad.safetensors"
    build(path)
    for call in (lambda: read_safetensors_header(path), lambda: inspect_lora(path), lambda: to_diffusers(path, TINY)):
        with pytest.raises(LoraError, match=message):
            call()


def test_metadata_trigger_words_and_schnell(tmp_path):
    pairs = canonical_pairs(TINY, rank=2, modules=lambda b: b == "img_in")
    meta = {
        "ss_tag_frequency": json.dumps({"5_zkz": {"zkz": 20, "a dog": 7}, "1_reg": {"zkz": 1, "grass": 2}}),
        "modelspec.architecture": "flux-1-schnell/lora",
        "ss_resolution": "(1024, 1024)",
        "ss_max_train_steps": "1500",
        "ss_seed": "42",
    }
    report = inspect_lora(write_lora(tmp_path / "m.safetensors", "kohya", pairs, TINY, meta), TINY, clip_config=CLIP)
    assert report.compatible and report.trigger_words == ["zkz", "a dog", "grass"]
    assert report.base_model_hint == "flux-1-schnell/lora" and "FLUX.1-schnell" in report.warnings[0]
    assert report.metadata["ss_resolution"] == "(1024, 1024)" and "ss_seed" not in report.metadata
    phrase = {"modelspec.trigger_phrase": "ohwx person, studio light"}
    report = inspect_lora(write_lora(tmp_path / "p.safetensors", "peft", pairs, TINY, phrase), TINY, clip_config=CLIP)
    assert report.trigger_words == ["ohwx person", "studio light"]
    json.dumps(report.to_dict())


def test_peft_scale_comes_from_adapter_metadata(tmp_path):
    pairs = canonical_pairs(TINY, rank=4, modules=lambda b: b in ("txt_in", "img_in"), alphas=(8.0, 2.0))
    path = write_lora(tmp_path / "peft.safetensors", "peft", pairs, TINY)
    assert json.loads(read_safetensors_header(path)["__metadata__"]["lora_adapter_metadata"])[
        "transformer.alpha_pattern"
    ]
    report = inspect_lora(path, TINY, clip_config=CLIP)
    assert report.scale == {"2.0": 1, "0.5": 1} and report.alpha == {"8.0": 1, "2.0": 1}
    bare = lf.save(tmp_path / "bare.safetensors", {k: v for k, v in lf.load(path).items()})
    assert inspect_lora(bare, TINY, clip_config=CLIP).scale == 1.0  # no metadata: diffusers' scale 1


def test_t5_diff_dora_nan_and_duplicates(tmp_path):
    pairs = canonical_pairs(TINY, rank=2, modules=lambda b: b == "img_in")
    base, _ = FORMATS["kohya"](pairs, TINY)
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    zero_t5 = {f"{t5}.lora_down.weight": torch.randn(2, 32), f"{t5}.lora_up.weight": torch.zeros(32, 2)}
    report = inspect_lora(lf.save(tmp_path / "t5z.safetensors", base | zero_t5), TINY, clip_config=CLIP)
    assert (
        report.compatible and report.t5 and report.modules["t5"] == 1 and "T5 part is all zeros" in report.warnings[0]
    )
    live_t5 = zero_t5 | {f"{t5}.lora_up.weight": torch.ones(32, 2)}
    report = inspect_lora(lf.save(tmp_path / "t5.safetensors", base | live_t5), TINY, clip_config=CLIP)
    assert not report.compatible and "adapts the T5 text encoder (1 module)" in report.problems[0]

    diff = {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": torch.zeros(16)}
    assert inspect_lora(lf.save(tmp_path / "d0.safetensors", base | diff), TINY, clip_config=CLIP).compatible
    diff = {k: torch.ones(16) for k in diff}
    report = inspect_lora(lf.save(tmp_path / "d1.safetensors", base | diff), TINY, clip_config=CLIP)
    assert "full weight deltas (.diff/.diff_b)" in report.problems[0] and report.format == "kohya"

    dora = {"lora_unet_img_in.dora_scale": torch.ones(1, 64)}
    report = inspect_lora(lf.save(tmp_path / "dora.safetensors", base | dora), TINY, clip_config=CLIP)
    assert report.format == "dora" and "DoRA needs the base weight norm; not supported yet" in report.problems[0]

    nan = dict(base, **{"lora_unet_img_in.lora_up.weight": torch.full((32, 2), float("nan"))})
    path = lf.save(tmp_path / "nan.safetensors", nan)
    assert inspect_lora(path, TINY, clip_config=CLIP).compatible  # header-only: values are read when converting
    with pytest.raises(LoraError, match=r"NaN or infinite values in 1 tensors \(e.g. lora_unet_img_in.lora_up"):
        to_diffusers(path, TINY, CLIP)

    twice = base | {
        "transformer.x_embedder.lora_A.weight": torch.ones(2, 64),
        "transformer.x_embedder.lora_B.weight": torch.ones(32, 2),
    }
    report = inspect_lora(lf.save(tmp_path / "twice.safetensors", twice), TINY, clip_config=CLIP)
    assert "x_embedder is adapted twice, by lora_unet_img_in and transformer.x_embedder" in report.problems[0]


def test_rank_zero_and_half_pairs_are_refused(tmp_path):
    """Shapes PEFT would only reject at load time (r = 0) or that form no delta are problems at inspection."""
    for tensors, message in (
        (
            {
                "lora_unet_img_in.lora_down.weight": torch.zeros(0, 64),
                "lora_unet_img_in.lora_up.weight": torch.zeros(32, 0),
            },
            r"do not form a rank-r pair \(r >= 1\)",
        ),
        ({"lora_unet_img_in.lora_down.weight": torch.zeros(2, 64)}, r"has only one half of the lora_A/lora_B"),
        (
            {
                "lora_unet_img_in.lokr_w1_a": torch.zeros(4, 2),
                "lora_unet_img_in.lokr_w1_b": torch.zeros(3, 8),
                "lora_unet_img_in.lokr_w2": torch.zeros(8, 8),
            },
            r"LoKr halves w1_a and w1_b of different ranks \(2, 3\)",
        ),
    ):
        path = lf.save(tmp_path / "bad.safetensors", tensors)
        report = inspect_lora(path, TINY, clip_config=CLIP)
        assert not report.compatible and re.search(message, report.problems[0]), report.problems
        with pytest.raises(LoraError, match=message):
            to_diffusers(path, TINY, CLIP)


def test_tensors_in_memory_convert_like_files(tmp_path):
    pairs = pairs_for("kohya", TINY, seed=9)
    tensors, meta = FORMATS["kohya"](pairs, TINY)
    converted = to_diffusers(tensors, TINY, CLIP, metadata=meta)
    assert converted.report.name == "<tensors>" and converted.report.compatible
    assert_exact(converted, pairs)


# --- the folder and uploads ----------------------------------------------------------------------------------------


def test_library_scans_caches_and_refuses(tmp_path, monkeypatch):
    folder = tmp_path / "loras"
    write_lora(folder / "a.safetensors", "kohya", pairs_for("kohya", TINY), TINY)
    write_lora(folder / "styles" / "b.safetensors", "peft", pairs_for("peft", TINY), TINY)
    lf.pickled(folder / "old.ckpt")
    lf.torch_zip(folder / "renamed.safetensors")
    (folder / "README.md").write_text("what goes here")
    (folder / ".upload-x.tmp").write_bytes(b"half")
    hashed, opened = [], []
    monkeypatch.setattr(convert, "file_sha256", lambda p, real=convert.file_sha256: hashed.append(p.name) or real(p))
    monkeypatch.setattr(
        convert, "read_safetensors_header", lambda p, real=read_safetensors_header: opened.append(p.name) or real(p)
    )
    library = LoraLibrary(folder, TINY, clip_config=CLIP)
    entries = {e.name: e for e in library.refresh()}
    assert list(entries) == ["a.safetensors", "old.ckpt", "renamed.safetensors", "styles/b.safetensors"]
    assert entries["a.safetensors"].usable and entries["styles/b.safetensors"].report.format == "peft"
    assert "pickles, which can run code" in entries["old.ckpt"].refused and "old.ckpt" not in opened
    assert "pickle/PyTorch checkpoint" in entries["renamed.safetensors"].refused
    assert sorted(hashed) == ["a.safetensors", "b.safetensors"]

    library.refresh()
    assert len(hashed) == 2  # unchanged files: nothing re-read
    write_lora(folder / "a.safetensors", "comfy", pairs_for("comfy", TINY), TINY)
    os.utime(folder / "a.safetensors", ns=(1, 1))
    assert library.get("a.safetensors").report.format == "comfyui" and hashed.count("a.safetensors") == 2

    outside = lf.save(tmp_path / "outside.safetensors", {"x.lora_A.weight": torch.zeros(1, 1)})
    (folder / "link.safetensors").symlink_to(outside)
    library.refresh()
    opened.clear()
    for bad, message in (
        ("../outside.safetensors", "not a LoRA name"),
        ("/etc/passwd", "not a LoRA name"),
        ("nope.safetensors", "No LoRA named 'nope.safetensors'"),
        ("link.safetensors", "outside the LoRA folder"),
        ("old.ckpt", "never opened"),
    ):
        with pytest.raises(LoraError, match=message):
            library.get(bad)
    assert opened == []


def test_upload_is_checked_named_and_atomic(tmp_path):
    folder = tmp_path / "loras"
    good = write_lora(tmp_path / "up1", "kohya", pairs_for("kohya", TINY), TINY)
    other = write_lora(tmp_path / "up2", "peft", pairs_for("peft", TINY), TINY)
    first = save_upload(good, folder, "../../My Style (v2)!.safetensors")
    assert first == folder / "My_Style_v2.safetensors" and first.read_bytes() == good.read_bytes()
    assert save_upload(good, folder, "My Style (v2)!.safetensors") == first  # same bytes: reused
    assert save_upload(other, folder, "My Style (v2)!.safetensors").name == "My_Style_v2-1.safetensors"
    assert save_upload(other, folder, "..").name == "lora.safetensors"
    for bad, message in (
        (lf.pickled(tmp_path / "p.safetensors"), "pickle/PyTorch checkpoint"),
        (
            lf.raw(tmp_path / "l", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8)),
            "lies about sizes",
        ),
    ):
        with pytest.raises(LoraError, match=message):
            save_upload(bad, folder, "x.safetensors")
    with pytest.raises(LoraError, match=r"uploads are limited to 0.0001 MB"):
        save_upload(good, folder, "big.safetensors", max_bytes=100)
    assert sorted(p.name for p in folder.iterdir()) == [
        "My_Style_v2-1.safetensors",
        "My_Style_v2.safetensors",
        "lora.safetensors",
    ]


def test_sample_loras_for_the_kits(tmp_path):
    transformer = dict(TINY_TRANSFORMER)
    paths = write_sample_loras(tmp_path / "a", transformer, CLIP, seed=0)
    again = write_sample_loras(tmp_path / "b", transformer, CLIP, seed=0)
    assert set(paths) == {"peft", "kohya", "comfy", "xlabs"}
    assert all(paths[f].read_bytes() == again[f].read_bytes() for f in paths)
    keys = read_safetensors_header(paths["kohya"]).keys()
    assert (
        "lora_unet_single_blocks_1_linear1.lora_down.weight" in keys
        and "lora_unet_double_blocks_0_img_attn_qkv.alpha" in keys
    )
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
    peft_meta = json.loads(read_safetensors_header(paths["peft"])["__metadata__"]["lora_adapter_metadata"])
    assert {"transformer.r", "transformer.lora_alpha"} <= peft_meta.keys()
    for fmt, path in paths.items():
        report = inspect_lora(path, TINY, clip_config=CLIP)
        assert report.compatible and report.format == FORMAT_NAMES[fmt], report.problems
        converted = to_diffusers(path, TINY, CLIP)
        assert all(v.abs().max() > 0 for k, v in converted.transformer.items() if "lora_B" in k)


# --- full and bias deltas, fp8 (issue 11) --------------------------------------------------------------------------


def _tiny_model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY_TRANSFORMER).eval()


def _effective(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) a linear layer acts with, adapters included: its outputs on the identity and on zero."""
    with torch.no_grad():
        bias = module(torch.zeros(1, module.in_features))[0]
        return (module(torch.eye(module.in_features)) - bias).T, bias


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2], ids=["f16", "e4m3", "e5m2"])
def test_bias_and_full_deltas_and_fp8_apply_exactly_on_the_model(tmp_path, strength, dtype):
    """ComfyUI LoraSave files (.diff_b, .diff), also in fp8: every adapted layer acts with W + s * delta and
    b + s * diff_b, loaded through diffusers' load_lora_adapter like every LoRA."""
    tensors, want = comfy_save(TINY, torch.Generator().manual_seed(11), dtype)
    report = inspect_lora(lf.save(tmp_path / "comfy.safetensors", tensors), TINY, clip_config=CLIP)
    assert report.compatible and not report.unmatched, report.problems
    assert "full deltas applied as extra delta modules: 2 weight (.diff), 5 bias (.diff_b)" in report.warnings
    assert any("fp8" in w for w in report.warnings) == (dtype != torch.float16)
    model = _tiny_model()
    base = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}  # fmt: skip
    model.load_lora_adapter(to_diffusers(tmp_path / "comfy.safetensors", TINY, CLIP).transformer,
                            prefix="transformer", adapter_name="x")  # fmt: skip
    model.set_adapters(["x"], weights=[strength])
    checked = 0
    for bfl, (delta, bias) in want.items():
        for module, d in lf.split_delta(bfl, delta, TINY).items():
            name = module.removeprefix("transformer.")
            b = lf.split_delta(bfl, bias[:, None], TINY)[module][:, 0]
            w_eff, b_eff = _effective(model.get_submodule(name))
            assert lf.relative_error(w_eff, base[name][0] + strength * d) < 1e-6, name
            assert lf.relative_error(b_eff, base[name][1] + strength * b) < 1e-6, name
            checked += 1
    assert checked == 7  # qkv is 3 modules, the rest 1 each


def test_wide_bias_and_full_deltas_convert_exactly(tmp_path):
    tensors, want = comfy_save(WIDE, torch.Generator().manual_seed(12))
    converted = to_diffusers(lf.save(tmp_path / "comfy.safetensors", tensors), WIDE, CLIP)
    sd = converted.transformer
    for bfl, (delta, bias) in want.items():
        for module, d in lf.split_delta(bfl, delta, WIDE).items():
            got = sd[f"{module}.lora_B.weight"] @ sd[f"{module}.lora_A.weight"]
            assert torch.allclose(got, d, atol=1e-6), module
            b = lf.split_delta(bfl, bias[:, None], WIDE)[module][:, 0]
            assert torch.equal(sd[f"{module}.lora_B.bias"], b), module


def test_full_delta_on_a_norm_is_refused_with_the_reason(tmp_path):
    t = {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": torch.ones(16)}
    report = inspect_lora(lf.save(tmp_path / "norm.safetensors", t), TINY, clip_config=CLIP)
    assert not report.compatible
    assert "would have to change the base weights, which this app never does (1 module)" in report.problems[-1]


def test_simpletuner_full_factor_16_lokr_at_real_width(tmp_path):
    """SimpleTuner's documented FLUX LoKr (lycoris_ names, full w1 and w2, factor 16) and the same in kohya naming on a
    fused real-width qkv: kept as the file's own factors (16x16 and 192x192 / 576x192), exact per part."""
    g, d = torch.Generator().manual_seed(3), WIDE.inner
    q, qkv = lf.lokr((d, d), (16, 16), None, None, g), lf.lokr((3 * d, d), (16, 16), None, None, g)
    tensors = {f"lycoris_transformer_blocks_0_attn_to_q.{r}": v for r, v in q.items()}
    tensors |= {f"lora_unet_double_blocks_0_txt_attn_qkv.{r}": v for r, v in qkv.items()}
    converted = to_diffusers(lf.save(tmp_path / "st.safetensors", tensors), WIDE, CLIP)
    parts = {f"transformer.{p.module}": p for p in converted.factored["transformer"]}
    assert {tuple(t.shape) for p in parts.values() for t in p.tensors.values()} == {(16, 16), (192, 192), (576, 192)}
    want = {"transformer.transformer_blocks.0.attn.to_q": lf.lokr_delta(q, None)}
    want |= lf.split_delta("double_blocks.0.txt_attn.qkv", lf.lokr_delta(qkv, None), WIDE)
    assert parts.keys() == want.keys()
    for module, delta in want.items():
        assert lf.relative_error(dense(parts[module]), delta) < 1e-6, module
