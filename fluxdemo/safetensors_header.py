"""The one safetensors header check: length, JSON, metadata and tensor layout, read without any tensor data.

It never unpickles and never opens a non-regular file. Faults are HeaderError phrases; each caller words its own
sentence (LoraError for LoRAs, ModelFileError for model files).
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
from pathlib import Path

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a LoRA header is a few hundred KB
DTYPE_BYTES = (
    dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 1)
    | dict.fromkeys(("I16", "U16", "F16", "BF16"), 2)
    | dict.fromkeys(("I32", "U32", "F32"), 4)
    | dict.fromkeys(("I64", "U64", "F64"), 8)
)
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


class HeaderError(ValueError):
    """What is wrong with a file's header, as a phrase: "<name> is {what}" when `kind` is "not", else
    "<name> is not a usable safetensors file: {what}". `kind` sorts the fault: not (another kind of file), length,
    start, json, object, metadata, tensor, extent (the tensors do not fill the file: `needed` bytes are)."""

    def __init__(self, what: str, kind: str, *, length: int = 0, size: int = 0, needed: int = 0, cause: str = ""):
        super().__init__(what)
        self.what, self.kind, self.length, self.size, self.needed, self.cause = what, kind, length, size, needed, cause


def read_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> dict:
    """The validated header {tensor: {dtype, shape, data_offsets}, "__metadata__": {...}}; reads no tensor data.

    Checks everything safetensors' own loader would; HeaderError names the first fault.
    """
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end; stat opens nothing
        raise HeaderError("not a regular file (a pipe, device or folder); it was not opened", "not")
    size = st.st_size
    with path.open("rb") as f:
        head = f.read(32)
        n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if not (len(head) > 8 and head[8:9] == b"{" and 2 <= n <= size - 8) or n > max_header_bytes:
            _framing(head, n, size, max_header_bytes)
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: a crafted nesting bomb
        raise HeaderError(f"its header is not valid UTF-8 JSON ({e})", "json", cause=str(e)) from None
    if not isinstance(header, dict):
        raise HeaderError("its header is not a JSON object", "object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError("its __metadata__ is not a map of strings", "metadata")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        check_layout(tensors, size - 8 - n)
    except HeaderError as e:
        e.length, e.size, e.needed = n, size, 8 + n + _extent(tensors)
        raise
    return header


def _framing(head: bytes, n: int, size: int, max_header_bytes: int) -> None:
    """Raise the HeaderError for a file whose first bytes are not a safetensors header's."""
    kind = "start" if 2 <= n <= min(size - 8, max_header_bytes) else "length"
    if not (len(head) > 8 and head[8:9] == b"{" and 2 <= n <= size - 8):
        for magic, what in _FOREIGN_MAGIC:
            if head.startswith(magic):
                raise HeaderError(what, "not", length=n, size=size)
        if size < 8:
            what = f"only {size} bytes, less than the 8-byte header length (truncated or empty)"
            raise HeaderError(what, kind, length=n, size=size)
        if n > max_header_bytes:  # no real header is that long: these bytes were never a safetensors file
            raise HeaderError(f"{_what_instead(head)}, not a safetensors file at all", "not", length=n, size=size)
        if n > size - 8:
            what = f"its header claims {n} bytes but the file has {size} (truncated); download it again"
            raise HeaderError(what, kind, length=n, size=size)
        raise HeaderError("it does not start with a safetensors header", kind, length=n, size=size)
    raise HeaderError(f"its header is {n} bytes, over the {max_header_bytes}-byte limit", kind, length=n, size=size)


def _what_instead(head: bytes) -> str:
    """What a file that is not safetensors looks like from its first bytes: text (quoted) or unknown binary data."""
    text = head.decode("utf-8", errors="ignore")  # ignore: the 32 bytes may end mid-character
    if len(text) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"a text file (it begins {text[:24]!r})"
    return "binary data of an unknown kind"


def check_layout(tensors: dict, data_len: int) -> None:
    """HeaderError unless each tensor has a known dtype and a shape filling its span, and the spans tile the data."""
    spans = []
    for name, info in tensors.items():
        begin, end = _span(name, info)
        if end > data_len:
            raise HeaderError(
                f"tensor {name!r} ends at byte {end} of a {data_len}-byte data section (truncated file); "
                "download it again",
                "extent",
            )
        spans.append((begin, end, name))
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps" if begin < position else "leaves a gap after"
            raise HeaderError(f"tensor {name!r} {what} {previous!r} in the data section (corrupt header)", "tensor")
        position, previous = end, name
    if position != data_len:
        raise HeaderError(
            f"{data_len - position} bytes follow the last tensor (corrupt or not a safetensors file)", "extent"
        )


def _span(name: str, info: object) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes, checked against its dtype and shape."""
    if not isinstance(info, dict) or info.get("dtype") not in DTYPE_BYTES:
        dtype = info.get("dtype") if isinstance(info, dict) else info
        raise HeaderError(f"tensor {name!r} has an unknown dtype {dtype!r}", "tensor")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    ok = isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
    if not ok or not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise HeaderError(f"tensor {name!r} has a malformed shape or data_offsets", "tensor")
    begin, end = offsets
    want = math.prod(shape) * DTYPE_BYTES[info["dtype"]]
    if not 0 <= begin <= end or end - begin != want:
        raise HeaderError(
            f"its header lies about sizes: {name!r} is {info['dtype']} {shape} = {want} bytes, but its "
            f"data_offsets {offsets} span {end - begin}",
            "tensor",
        )
    return begin, end


def _extent(tensors: dict) -> int:
    """Where the last tensor ends in the data section, by its data_offsets (0 when they are unreadable)."""
    try:
        return max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return 0


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
