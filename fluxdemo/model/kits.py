"""Where the tiny kits live: plain paths, no torch, so the CLI can find a kit's LoRA folder before it imports any."""

from __future__ import annotations

import os
from pathlib import Path

KIT_VERSION = 1  # bump whenever what build_kit writes changes: it names the cache folder, so old kits are rebuilt
KINDS = ("tiny", "tiny-wide")


def kit_cache_dir() -> Path:
    """Where ensure_kit keeps built kits: $FLUXDEMO_CACHE/kits, else ~/.cache/fluxdemo/kits."""
    root = os.environ.get("FLUXDEMO_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fluxdemo") / "kits"


def kit_folder(kind: str, cache_dir: Path | None = None) -> Path:
    """The folder of the kit of `kind` (built or not)."""
    return (Path(cache_dir) if cache_dir is not None else kit_cache_dir()) / f"{kind}-v{KIT_VERSION}"
