"""Each wrong model file gets its own sentence: built from the kit's real weights, then broken one way."""

from pathlib import Path

import gguf
import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from fluxdemo import loading
from fluxdemo.errors import ModelFileError
from fluxdemo.tiny import TINY_TRANSFORMER, to_bfl_state_dict


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
