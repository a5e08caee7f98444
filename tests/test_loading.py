"""Each wrong model file gets its own sentence: built from the kit's real weights, then broken one way."""

from pathlib import Path

import gguf
import pytest
import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
from diffusers.models.model_loading_utils import load_gguf_checkpoint
from diffusers.quantizers.gguf.utils import GGUFParameter
from safetensors.torch import save_file

from fluxdemo.errors import ModelFileError
from fluxdemo.model import loading
from fluxdemo.model.names import FluxDims
from fluxdemo.model.tiny import TINY_TRANSFORMER, to_bfl_state_dict


def write_bfl_gguf(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    writer = gguf.GGUFWriter(path=None, arch="flux")
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def bfl_tensors(tiny_kit) -> dict[str, torch.Tensor]:
    model = FluxTransformer2DModel.from_pretrained(tiny_kit, subfolder="transformer")
    return dict(to_bfl_state_dict(model.state_dict(), model.config))


def load(path: Path, kit: Path):
    return loading.load_transformer(path, kit, torch.float32)


def test_f32_bfl_gguf_loads_exactly(tmp_path, tiny_kit, bfl_tensors):
    model, summary = load(write_bfl_gguf(tmp_path / "f32.gguf", bfl_tensors), tiny_kit)
    reference = FluxTransformer2DModel.from_pretrained(tiny_kit, subfolder="transformer").state_dict()
    ours = model.state_dict()
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert summary.quant == f"F32 ({len(bfl_tensors)})"


def test_comfy_prefix_is_accepted(tmp_path, tiny_kit, bfl_tensors):
    prefixed = {f"model.diffusion_model.{k}": v for k, v in bfl_tensors.items()}
    model, _ = load(write_bfl_gguf(tmp_path / "comfy.gguf", prefixed), tiny_kit)
    assert model.config.num_layers == TINY_TRANSFORMER["num_layers"]


def test_not_a_gguf(tmp_path, tiny_kit):
    path = tmp_path / "flux1-dev-Q8_0.gguf"
    path.write_bytes(b"<html>404 Not Found</html>" * 10)
    with pytest.raises(ModelFileError) as e:
        load(path, tiny_kit)
    assert str(e.value) == "flux1-dev-Q8_0.gguf is not a GGUF file (it starts with b'<htm'). Download it again."


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_gguf(tmp_path, tiny_kit, cut):
    data = (tiny_kit / "gguf" / "flux1-tiny-Q8_0.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ModelFileError, match=r"^cut.gguf is not a readable GGUF file \(.+\)\. Download it again.$"):
        load(path, tiny_kit)


@pytest.mark.parametrize("field", ["tensors", "metadata"])
def test_gguf_header_with_absurd_counts_is_refused(tmp_path, tiny_kit, field):
    data = bytearray((tiny_kit / "gguf" / "flux1-tiny-Q8_0.gguf").read_bytes())
    data[8 if field == "tensors" else 16 : 24 if field == "metadata" else 16] = (2**40).to_bytes(8, "little")
    path = tmp_path / "lying.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"^lying.gguf is not a readable GGUF file"):
        load(path, tiny_kit)


def test_t5_file_given_as_transformer(tiny_kit):
    path = tiny_kit / "gguf" / "t5-v1_1-tiny-encoder-Q8_0.gguf"
    with pytest.raises(ModelFileError) as e:
        load(path, tiny_kit)
    assert str(e.value) == (
        "t5-v1_1-tiny-encoder-Q8_0.gguf is a T5 text encoder: it has no double_blocks/single_blocks tensors. "
        "Point the transformer at a FLUX GGUF such as city96/FLUX.1-dev-gguf's flux1-dev-Q8_0.gguf."
    )


def test_schnell_file_for_dev(tmp_path, tiny_kit, bfl_tensors):
    schnell = {k: v for k, v in bfl_tensors.items() if not k.startswith("guidance_in.")}
    with pytest.raises(ModelFileError) as e:
        load(write_bfl_gguf(tmp_path / "schnell.gguf", schnell), tiny_kit)
    assert str(e.value).startswith("schnell.gguf has no guidance_in: it is FLUX.1-schnell")


@pytest.mark.parametrize(("channels", "variant"), [(384, "FLUX.1 Fill (inpainting)"), (128, "FLUX.1 Canny/Depth")])
def test_fill_and_control_variants(tmp_path, tiny_kit, bfl_tensors, channels, variant):
    widened = {**bfl_tensors, "img_in.weight": torch.zeros(32, channels)}
    with pytest.raises(ModelFileError) as e:
        load(write_bfl_gguf(tmp_path / "variant.gguf", widened), tiny_kit)
    assert str(e.value).startswith(f"variant.gguf is {variant}")
    assert f"img_in takes {channels} channels, text-to-image takes 64" in str(e.value)


def test_missing_blocks(tmp_path, tiny_kit, bfl_tensors):
    pruned = {k: v for k, v in bfl_tensors.items() if not k.startswith("single_blocks.1.")}
    with pytest.raises(ModelFileError) as e:
        load(write_bfl_gguf(tmp_path / "pruned.gguf", pruned), tiny_kit)
    assert str(e.value).startswith("pruned.gguf is incomplete: single_blocks 1 missing (1 of 2 present).")


def test_missing_tensor_inside_a_block(tmp_path, tiny_kit, bfl_tensors):
    broken = {k: v for k, v in bfl_tensors.items() if k != "double_blocks.0.img_mlp.2.bias"}
    with pytest.raises(ModelFileError) as e:
        load(write_bfl_gguf(tmp_path / "broken.gguf", broken), tiny_kit)
    assert (
        str(e.value) == "broken.gguf lacks 1 FLUX tensors, e.g. ['double_blocks.0.img_mlp.2.bias']. Download it again."
    )


def test_flux_of_another_width(tmp_path, tiny_kit):
    wider = FluxTransformer2DModel(**{**TINY_TRANSFORMER, "num_attention_heads": 3})
    tensors = dict(to_bfl_state_dict(wider.state_dict(), wider.config))
    with pytest.raises(ModelFileError) as e:
        load(write_bfl_gguf(tmp_path / "wide.gguf", tensors), tiny_kit)
    assert str(e.value) == "wide.gguf is a FLUX of width 48, the config says 32: it belongs to another model."


def test_transformer_given_as_t5(tiny_kit):
    path = tiny_kit / "gguf" / "flux1-tiny-Q8_0.gguf"
    with pytest.raises(ModelFileError, match=r"^flux1-tiny-Q8_0.gguf is not a T5 encoder GGUF in llama.cpp naming"):
        loading.load_t5(path, tiny_kit, torch.float32)


def test_corrupt_safetensors(tmp_path, tiny_kit):
    path = tmp_path / "model.safetensors"
    path.write_bytes((tiny_kit / "text_encoder" / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ModelFileError, match=r"^model.safetensors is not a readable safetensors file"):
        loading.load_clip(path, tiny_kit, torch.float32)


def test_safetensors_of_another_component(tmp_path, tiny_kit):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ModelFileError, match=r"^vae.safetensors does not fit CLIPTextModel: \d+ missing tensors"):
        loading.load_clip(path, tiny_kit, torch.float32)


def test_quanto_t5_from_safetensors(tiny_kit, manager):
    t5, summary = loading.load_t5(tiny_kit / "text_encoder_2" / "model.safetensors", tiny_kit, torch.float32)
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.inference_mode():
        a, b = t5(ids)[0], manager.get("text_encoder_2")(ids)[0]
    assert summary.quant == "quanto qint8"
    assert ((a - b).norm() / b.norm()).item() < 3e-2  # two 8-bit roundings of the same weights


# -- memory-mapped weights ------------------------------------------------------------------------------------------
def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps the file at path, from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        lines = [line.split(maxsplit=5) for line in f.read().splitlines()]
    return [tuple(int(x, 16) for x in fields[0].split("-")) for fields in lines
            if len(fields) == 6 and fields[5] == str(path.resolve())]  # fmt: skip


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


def assert_views_of(model: torch.nn.Module, path: Path) -> int:
    """Every packed weight's bytes lie inside a mapping of its file; returns how many packed weights there are."""
    ranges = mapped_ranges(path)
    packed = [p for p in model.parameters() if isinstance(p, GGUFParameter)]
    for p in packed:
        start = p.untyped_storage().data_ptr()
        end = start + p.untyped_storage().nbytes()
        assert any(lo <= start and end <= hi for lo, hi in ranges), f"a packed weight was copied out of {path.name}"
    return len(packed)


def copying_loader(path: Path, kit: Path) -> torch.nn.Module:
    """The transformer as it was loaded before memory mapping: diffusers' load_gguf_checkpoint copies every tensor."""
    state_dict = loading.bfl_to_diffusers(load_gguf_checkpoint(path), FluxDims.from_config(loading.read_config(
        kit, "transformer")))  # fmt: skip
    return FluxTransformer2DModel.from_single_file(
        state_dict, config=str(kit), subfolder="transformer", torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
    )  # fmt: skip


def transformer_inputs(config: dict, tokens: int = 4, text: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, tokens, config["in_channels"], generator=g),
            "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], generator=g),
            "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g),
            "timestep": torch.tensor([0.5]), "guidance": torch.tensor([3.5]),
            "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text, 3)}  # fmt: skip


def assert_same_as_copying_loader(path: Path, kit: Path) -> None:
    ours, _ = load(path, kit)
    theirs = copying_loader(path, kit)
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    inputs = transformer_inputs(loading.read_config(kit, "transformer"))
    with torch.inference_mode():
        assert torch.equal(ours(**inputs, return_dict=False)[0], theirs(**inputs, return_dict=False)[0])


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")


@needs_proc
def test_packed_weights_stay_views_of_their_files(tiny_kit):
    flux = tiny_kit / "gguf" / "flux1-tiny-Q8_0.gguf"
    t5 = tiny_kit / "gguf" / "t5-v1_1-tiny-encoder-Q8_0.gguf"
    model, _ = load(flux, tiny_kit)
    # In diffusers' names a double block has 14 linear layers (the fused qkv split in three), a single block 6.
    assert (
        assert_views_of(model, flux) == 14 * TINY_TRANSFORMER["num_layers"] + 6 * TINY_TRANSFORMER["num_single_layers"]
    )
    encoder, _ = loading.load_t5(t5, tiny_kit, torch.float32)
    assert assert_views_of(encoder, t5) == 2 * 7  # per T5 block: q, k, v, o, wi_0, wi_1, wo
    assert set(loading.file_backed(model.named_parameters())) == {
        n for n, p in model.named_parameters() if isinstance(p, GGUFParameter) or p.dtype == torch.float32
    } - {"norm_out.linear.weight", "norm_out.linear.bias"}  # the final norm's halves are swapped: a copy


@needs_proc
def test_a_write_to_a_mapped_weight_never_reaches_the_file(tiny_kit, tmp_path):
    path = tmp_path / "flux.gguf"
    path.write_bytes((tiny_kit / "gguf" / "flux1-tiny-Q8_0.gguf").read_bytes())
    before = path.read_bytes()
    model, _ = load(path, tiny_kit)
    weight = model.transformer_blocks[0].attn.to_q.weight.as_tensor()  # the packed bytes, as a plain tensor
    weight.fill_(7)  # copy-on-write: the kernel copies the touched pages into this process only
    assert bool((weight == 7).all()) and path.read_bytes() == before


def test_images_equal_the_copying_loader_on_the_tiny_kit(tiny_kit):
    assert_same_as_copying_loader(tiny_kit / "gguf" / "flux1-tiny-Q8_0.gguf", tiny_kit)


@pytest.mark.slow
@needs_proc
def test_real_width_transformer_costs_no_anonymous_memory_for_its_blocks(tiny_wide_kit):
    path = tiny_wide_kit / "gguf" / "flux1-tiny-wide-Q8_0.gguf"
    size = path.stat().st_size  # 0.71 GB, of which the packed blocks are 0.46 GB
    anon = rss("RssAnon")
    model, summary = load(path, tiny_wide_kit)
    grown = rss("RssAnon") - anon
    assert_views_of(model, path)
    # Only the swapped halves of the final norm (2 x 3072 x 3072 F32, 75.5 MB) are copied; the copying loader grew by
    # more than the file's size.
    assert grown < 0.15 * size, f"loading grew anonymous memory by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"
    assert_same_as_copying_loader(path, tiny_wide_kit)
