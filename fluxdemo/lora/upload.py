"""LoRA uploads: checked before they are copied, stored under a clean unique name, within the folder's quotas."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
import threading
from pathlib import Path

from fluxdemo.errors import LoraError
from fluxdemo.files import new_file_mode
from fluxdemo.lora.header import file_sha256, read_safetensors_header

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 2 * 2**30  # a rank-128 LoRA on every FLUX.1 linear is about 1.2 GB in bf16
# Quotas for what visitors can store: files per upload request, and the LoRA folder's file count and total size.
MAX_UPLOAD_FILES = 4
MAX_FOLDER_FILES = 200
MAX_FOLDER_BYTES = 50 * 2**30
# --- upload ---------------------------------------------------------------------------------------------------------

_UPLOAD_LOCK = threading.Lock()  # picking a free name and renaming onto it must not interleave


def _sanitise(original_name: str) -> str:
    base = re.split(r"[\\/]", original_name)[-1]
    stem = base[: -len(".safetensors")] if base.lower().endswith(".safetensors") else base.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:80] or "lora"


def check_upload_count(count: int, max_files: int = MAX_UPLOAD_FILES) -> None:
    """LoraError when one upload request carries more files than allowed (checked before any file is read)."""
    if count > max_files:
        raise LoraError(f"{count} files in one upload; at most {max_files} at a time. Upload them in smaller groups.")


def _folder_usage(folder: Path) -> tuple[int, int]:
    """(LoRA files, their bytes) in the folder, recursively; only regular files count, and none is opened."""
    files = total = 0
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            try:
                st = os.stat(Path(dirpath) / filename, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and filename.lower().endswith(".safetensors"):
                files, total = files + 1, total + st.st_size
    return files, total


def save_upload(
    src: Path,
    folder: Path,
    original_name: str,
    max_bytes: int = MAX_UPLOAD_BYTES,
    *,
    max_files: int = MAX_FOLDER_FILES,
    max_folder_bytes: int = MAX_FOLDER_BYTES,
) -> Path:
    """Store an uploaded LoRA in `folder` under a safe unique name; returns its path (an identical file is reused).

    The size and the folder's quotas are checked first and the header validated before any tensor byte is copied;
    the copy is validated again (what we keep is what we checked) and moved into place atomically.
    """
    src, folder = Path(src), Path(folder)
    size = src.stat().st_size
    if size > max_bytes:
        raise LoraError(f"{original_name} is {size / 1e6:g} MB; uploads are limited to {max_bytes / 1e6:g} MB.")
    files, used = _folder_usage(folder)
    if files >= max_files:
        raise LoraError(
            f"The LoRA folder already holds {files} LoRA files, its limit is {max_files}; remove some before "
            "uploading more."
        )
    if used + size > max_folder_bytes:
        raise LoraError(
            f"{original_name} ({size / 1e6:g} MB) would take the LoRA folder past its {max_folder_bytes / 1e9:g} GB "
            f"limit ({used / 1e9:.2f} GB in use); remove some LoRAs before uploading more."
        )
    read_safetensors_header(src)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    os.fchmod(fd, new_file_mode())  # as any file the user saves, not mkstemp's 0600
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            while chunk := inp.read(1 << 22):
                digest.update(chunk)
                out.write(chunk)
                if out.tell() > max_bytes:
                    raise LoraError(f"{original_name} grew past {max_bytes / 1e6:g} MB while being copied.")
            out.flush()
            os.fsync(out.fileno())
        read_safetensors_header(tmp)
        with _UPLOAD_LOCK:
            dest = _free_name(folder, _sanitise(original_name), digest.hexdigest(), tmp.stat().st_size)
            if dest.exists():
                tmp.unlink()
            else:
                os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("LoRA upload %s stored as %s", original_name, dest.name)
    return dest


def _free_name(folder: Path, stem: str, sha256: str, size: int) -> Path:
    """stem.safetensors, stem-1, stem-2, ... or stem-<hash>; an existing file with the same bytes is returned."""
    candidates = [f"{stem}.safetensors"] + [f"{stem}-{i}.safetensors" for i in range(1, 100)]
    for candidate in [*candidates, f"{stem}-{sha256[:12]}.safetensors"]:
        path = folder / candidate
        if not path.exists():
            return path
        if path.is_file() and path.stat().st_size == size and file_sha256(path) == sha256:
            return path
    raise LoraError(f"Too many uploads named {stem!r} in {folder}; rename the file and upload it again.")
