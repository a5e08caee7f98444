"""Pictures with a LoRA equal the hand merge (W + strength * delta, bias + strength * diff_b) within 1/255, through
the whole stack: library, converter, adapters on the packed GGUF transformer, pipeline; on the tiny kit and on the
real-width one (3072 wide: the real fused qkv and linear1 splits, the real LoKr factors)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lora_factory as lf
import numpy as np
import pytest
import torch
from helpers import tiny_model
from lora_factory import TINY, WIDE, comfy_save

from fluxdemo.model.names import FluxDims
from fluxdemo.model.presets import get_preset
from fluxdemo.pipeline import GenerateOptions, Model, generate

OPTS = GenerateOptions("a lighthouse at dusk", seed=5, steps=3, width=32, height=32)
# At real width a step dequantizes 0.5 GB of Q8_0 blocks (about 5 s on 2 CPU cores) whatever the picture's size:
# one step, and 16 T5 tokens so that the text adds nothing to it.
WIDE_OPTS = GenerateOptions("a lighthouse at dusk", seed=5, steps=1, width=32, height=32, max_sequence_length=16)
# The tiny kit checks both strengths; at real width, where a step is dear, 0.5 alone (a scale that is not 1)
STRENGTHS = {"tiny": (1.0, 0.5), "tiny-wide": (0.5,)}
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def module_deltas(want: dict, dims: FluxDims) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BFL module (delta, bias delta) -> per diffusers module, rows split and halves swapped like the model's."""
    out = {}
    for bfl, (delta, bias) in want.items():
        biases = lf.split_delta(bfl, bias[:, None], dims)
        out |= {m: (d, biases[m][:, 0]) for m, d in lf.split_delta(bfl, delta, dims).items()}
    return out


@dataclass
class Bench:
    """A kit's two managers, shared by the tests of this module: one takes the test files from `folder`, the other
    never loads a LoRA and makes the base picture and the hand merges (on its weights unpacked once)."""

    dims: FluxDims
    options: GenerateOptions
    folder: Path
    strengths: tuple[float, ...]
    adapted: Model
    reference: Model
    baseline: np.ndarray

    def assert_picture_is_the_hand_merge(self, name: str, tensors: dict, deltas: dict) -> None:
        """The file's picture at the kit's strengths against the hand merge of `deltas`, which moves the picture
        visibly (so that 1/255 means something)."""
        lf.save(self.folder / name, tensors)
        for strength in self.strengths:
            adapted = pixels(generate(self.adapted, self.options, name, strength).images["lora"])
            with lf.HandMerge(self.reference.get("transformer"), deltas, strength):
                merged = pixels(generate(self.reference, self.options).images["baseline"])
            moved = np.abs(merged - self.baseline).mean()
            assert moved > 1.0, (strength, moved)
            worst = int(np.abs(adapted - merged).max())
            assert worst <= 1, (strength, worst)


def unpack(transformer: torch.nn.Module) -> None:
    """Each packed weight dequantized once, as GGUFLinear does on every call (dequantize, cast to the compute dtype):
    the same numbers, without unpacking 0.5 GB per step of each hand merge at real width."""
    from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor

    for m in transformer.modules():
        if isinstance(m, GGUFLinear) and hasattr(m.weight, "quant_type"):
            m.weight = torch.nn.Parameter(dequantize_gguf_tensor(m.weight).to(m.compute_dtype), requires_grad=False)


def make_bench(kind: str, kit: Path, folder: Path) -> Bench:
    preset = get_preset(kind, use_env=False)
    options = OPTS if kind == "tiny" else WIDE_OPTS
    reference = tiny_model(kit / "loras", preset)
    baseline = pixels(generate(reference, options).images["baseline"])  # also loads the transformer
    unpack(reference.get("transformer"))
    assert np.array_equal(pixels(generate(reference, options).images["baseline"]), baseline)
    adapted = tiny_model(folder, preset)
    return Bench(TINY if kind == "tiny" else WIDE, options, folder, STRENGTHS[kind], adapted, reference, baseline)


@pytest.fixture(scope="module")
def tiny_bench(tiny_kit, tmp_path_factory) -> Bench:
    return make_bench("tiny", tiny_kit, tmp_path_factory.mktemp("tiny-loras"))


@pytest.fixture(scope="module")
def wide_bench(tiny_wide_kit, tmp_path_factory) -> Bench:
    return make_bench("tiny-wide", tiny_wide_kit, tmp_path_factory.mktemp("wide-loras"))


@pytest.fixture
def bench(request) -> Bench:
    return request.getfixturevalue(f"{request.param}_bench")


SLOW = pytest.mark.slow  # the real-width kit: about 30 s to build, 5 s a step on 2 CPU cores


@pytest.mark.parametrize(
    "bench, dtype",
    [
        ("tiny", torch.float16),
        ("tiny", E4M3),
        ("tiny", E5M2),
        # f16 and e5m2 stay on the tiny kit: a real-width step is dear, and the width changes what is split (the
        # fused qkv and linear1), not how a dtype is read. e4m3 goes wide: the narrower range, which a real-width
        # delta of size 1/width would fall below (lora_factory.comfy_save)
        pytest.param("wide", E4M3, marks=SLOW),
    ],
    ids=["tiny-f16", "tiny-e4m3", "tiny-e5m2", "wide-e4m3"],
    indirect=["bench"],
)
def test_comfy_bias_and_full_deltas(bench, dtype):
    # size 8: strong enough to move a 32x32 picture visibly on both kits
    tensors, want = comfy_save(bench.dims, torch.Generator().manual_seed(21), dtype, size=8)
    bench.assert_picture_is_the_hand_merge(f"comfy-{dtype}.safetensors", tensors, module_deltas(want, bench.dims))


def lycoris_file(dims: FluxDims, g: torch.Generator) -> tuple[dict, dict]:
    """SimpleTuner's documented FLUX LoKr (full w1 and w2, factor 16, diffusers names under `lycoris_`), kohya-named
    LoKr with a decomposed w2, and a kohya-named LoHa; -> (tensors, per diffusers module (delta, None))."""
    d, t, want = dims.inner, {}, {}
    last_double, last_single = dims.num_double - 1, dims.num_single - 1
    for module, (out, inp) in {
        "transformer_blocks.0.attn.to_q": (d, d),
        f"single_transformer_blocks.{last_single}.proj_out": (d, d + dims.mlp),
    }.items():
        kind = lf.lokr((out, inp), (16, 16), None, None, g)
        kind["lokr_w1"] = kind["lokr_w1"] * 0.1
        t |= {f"lycoris_{module.replace('.', '_')}.{r}": v for r, v in kind.items()}
        want[f"transformer.{module}"] = (lf.lokr_delta(kind, None), None)
    kind = lf.lokr((3 * d, d), (4, 4), 2, None, g)
    qkv = f"double_blocks.{last_double}.txt_attn.qkv"
    t |= {f"lora_unet_{qkv.replace('.', '_')}.{r}": v for r, v in kind.items()}
    t[f"lora_unet_{qkv.replace('.', '_')}.alpha"] = torch.tensor(0.5)
    want |= {m: (x, None) for m, x in lf.split_delta(qkv, lf.lokr_delta(kind, 0.5), dims).items()}
    kind = lf.loha((2 * d, d), 3, g)
    t |= {f"lora_unet_final_layer_adaLN_modulation_1.{r}": v for r, v in kind.items()}
    t["lora_unet_final_layer_adaLN_modulation_1.alpha"] = torch.tensor(1.5)
    delta = lf.loha_delta(kind, 1.5).float()
    want |= {m: (x, None) for m, x in lf.split_delta("final_layer.adaLN_modulation.1", delta, dims).items()}
    return t, want


@pytest.mark.parametrize("bench", ["tiny", pytest.param("wide", marks=SLOW)], indirect=True)
def test_lokr_and_loha_factored(bench):
    tensors, want = lycoris_file(bench.dims, torch.Generator().manual_seed(31))
    bench.assert_picture_is_the_hand_merge("lycoris.safetensors", tensors, want)


def test_a_clip_only_lokr_changes_the_picture_and_is_off_at_zero(tiny_kit, tmp_path):
    """A LoKr on CLIP-L alone: no transformer keys, so a zero anchor pair registers the adapter; the text encoder
    is adapted (the prompt encoded again) and strength 0 gives the base picture bit for bit."""
    kind = lf.lokr((32, 32), (4, 4), None, None, torch.Generator().manual_seed(0))
    folder = tmp_path / "loras"
    folder.mkdir()
    prefix = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    lf.save(folder / "clip.safetensors", {f"{prefix}.{r}": v * 3 for r, v in kind.items()})
    manager = tiny_model(folder)
    base = pixels(generate(manager, OPTS).images["baseline"])
    adapted = generate(manager, OPTS, "clip.safetensors", 1.0)
    assert adapted.report.text_encoder_lora is True
    assert np.abs(pixels(adapted.images["lora"]) - base).mean() > 1.0
    assert np.array_equal(pixels(generate(manager, OPTS, "clip.safetensors", 0.0).images["lora"]), base)
