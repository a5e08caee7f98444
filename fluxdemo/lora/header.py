"""A safetensors file's header, read and checked before any tensor is: the one reader of the package."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import stat
from pathlib import Path

import torch

from fluxdemo.errors import LoraError

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a LoRA header is a few hundred KB
DTYPE_BYTES = (
    dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 1)
    | dict.fromkeys(("I16", "U16", "F16", "BF16"), 2)
    | dict.fromkeys(("I32", "U32", "F32"), 4)
    | dict.fromkeys(("I64", "U64", "F64"), 8)
)
TORCH_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"} | {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_PICKLE = (
    "a pickle/PyTorch checkpoint, not safetensors; it was not opened, because unpickling can run code. Get the "
    ".safetensors release of this LoRA, or convert it where you trust the file (torch.load, then "
    "safetensors.torch.save_file)"
)
_FOREIGN_MAGIC = (  # first bytes -> what the file really is
    (b"PK\x03\x04", _PICKLE),
    (b"\x80", _PICKLE),
    (b"GGUF", "a GGUF model file, not a LoRA"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself; fetch it with `git lfs pull`"),
    (b"<", "an HTML/XML page (a failed or login-gated download?), not safetensors; download the file again"),
)
# What the report shows of a file's metadata (kohya's ss_* keys, the modelspec standard).
META_KEYS = tuple(
    "modelspec.architecture modelspec.title modelspec.trigger_phrase modelspec.resolution ss_base_model_version "  # noqa: SIM905
    "ss_sd_model_name ss_network_module ss_network_dim ss_network_alpha ss_network_args ss_resolution "
    "ss_max_train_steps ss_steps ss_epoch ss_num_train_images ss_output_name ss_training_comment".split()
)


# --- reading ----------------------------------------------------------------------------------------------------


def bad_file(path: Path, what: str) -> LoraError:
    return LoraError(f"{path.name} is not a usable safetensors file: {what}.")


def _what_instead(head: bytes) -> str:
    """What a file that is not safetensors looks like from its first bytes: text (quoted) or unknown binary data."""
    text = head.decode("utf-8", errors="ignore")  # ignore: the 32 bytes may end mid-character
    if len(text) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"a text file (it begins {text[:24]!r})"
    return "binary data of an unknown kind"


def read_safetensors_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> dict:
    """The validated header {tensor: {dtype, shape, data_offsets}, "__metadata__": {...}}; reads no tensor data.

    Checks everything safetensors' own loader would, but with a message a person can act on; never unpickles.
    """
    path = Path(path)
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end; stat opens nothing
        raise LoraError(f"{path.name} is not a regular file (a pipe, device or folder); it was not opened.")
    size = st.st_size
    with path.open("rb") as f:
        head = f.read(32)
        n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if not (len(head) > 8 and head[8:9] == b"{" and 2 <= n <= size - 8):
            for magic, what in _FOREIGN_MAGIC:
                if head.startswith(magic):
                    raise LoraError(f"{path.name} is {what}.")
            if size < 8:
                raise bad_file(path, f"only {size} bytes, less than the 8-byte header length (truncated or empty)")
            if n > max_header_bytes:  # no real header is that long: these bytes were never a safetensors file
                raise LoraError(f"{path.name} is {_what_instead(head)}, not a safetensors file at all.")
            if n > size - 8:
                raise bad_file(
                    path, f"its header claims {n} bytes but the file has {size} (truncated); download it again"
                )
            raise bad_file(path, "it does not start with a safetensors header")
        if n > max_header_bytes:
            raise bad_file(path, f"its header is {n} bytes, over the {max_header_bytes}-byte limit")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: a crafted nesting bomb
        raise bad_file(path, f"its header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad_file(path, "its header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad_file(path, "its __metadata__ is not a map of strings")
    _check_layout(path, {k: v for k, v in header.items() if k != "__metadata__"}, size - 8 - n)
    return header


def _check_layout(path: Path, tensors: dict, data_len: int) -> None:
    spans = []
    for name, info in tensors.items():
        if not isinstance(info, dict) or info.get("dtype") not in DTYPE_BYTES:
            raise bad_file(
                path, f"tensor {name!r} has an unknown dtype {info.get('dtype') if isinstance(info, dict) else info!r}"
            )
        shape, offsets = info.get("shape"), info.get("data_offsets")
        ok = isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
        if not ok or not (
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        ):
            raise bad_file(path, f"tensor {name!r} has a malformed shape or data_offsets")
        begin, end = offsets
        want = math.prod(shape) * DTYPE_BYTES[info["dtype"]]
        if not 0 <= begin <= end or end - begin != want:
            raise bad_file(
                path,
                f"its header lies about sizes: {name!r} is {info['dtype']} {shape} = {want} bytes, but its "
                f"data_offsets {offsets} span {end - begin}",
            )
        if end > data_len:
            raise bad_file(
                path,
                f"tensor {name!r} ends at byte {end} of a {data_len}-byte data section (truncated file); "
                "download it again",
            )
        spans.append((begin, end, name))
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps" if begin < position else "leaves a gap after"
            raise bad_file(path, f"tensor {name!r} {what} {previous!r} in the data section (corrupt header)")
        position, previous = end, name
    if position != data_len:
        raise bad_file(path, f"{data_len - position} bytes follow the last tensor (corrupt or not a safetensors file)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
