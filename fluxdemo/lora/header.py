"""A LoRA file's safetensors header (checked by fluxdemo.safetensors_header, its faults worded as LoraErrors), and
the dtypes and metadata keys a LoRA report reads."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fluxdemo.errors import LoraError
from fluxdemo.safetensors_header import DTYPE_BYTES as DTYPE_BYTES
from fluxdemo.safetensors_header import MAX_HEADER_BYTES, HeaderError, read_header
from fluxdemo.safetensors_header import file_sha256 as file_sha256

logger = logging.getLogger(__name__)

TORCH_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"} | {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
# What the report shows of a file's metadata (kohya's ss_* keys, the modelspec standard).
META_KEYS = tuple(
    "modelspec.architecture modelspec.title modelspec.trigger_phrase modelspec.resolution ss_base_model_version "  # noqa: SIM905
    "ss_sd_model_name ss_network_module ss_network_dim ss_network_alpha ss_network_args ss_resolution "
    "ss_max_train_steps ss_steps ss_epoch ss_num_train_images ss_output_name ss_training_comment".split()
)


def bad_file(path: Path, what: str) -> LoraError:
    return LoraError(f"{path.name} is not a usable safetensors file: {what}.")


def read_safetensors_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> dict:
    """The validated header {tensor: {dtype, shape, data_offsets}, "__metadata__": {...}}; reads no tensor data.
    The checks are fluxdemo.safetensors_header's (everything safetensors' loader checks); the words are a LoRA's."""
    path = Path(path)
    try:
        return read_header(path, max_header_bytes)
    except HeaderError as e:
        raise (LoraError(f"{path.name} is {e.what}.") if e.kind == "not" else bad_file(path, e.what)) from None
