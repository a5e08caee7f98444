"""Where the tiny kits live: plain paths, no torch, so the CLI can find a kit's LoRA folder before it imports any."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from fluxdemo.model.presets import ENV_OVERRIDES, PRESETS

KIT_VERSION = 1  # bump whenever what build_kit writes changes: it names the cache folder, so old kits are rebuilt
KINDS = ("tiny", "tiny-wide")


def kit_cache_dir() -> Path:
    """Where ensure_kit keeps built kits: $FLUXDEMO_CACHE/kits, else ~/.cache/fluxdemo/kits."""
    root = os.environ.get("FLUXDEMO_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fluxdemo") / "kits"


def kit_folder(kind: str, cache_dir: Path | None = None) -> Path:
    """The folder of the kit of `kind` (built or not)."""
    return (Path(cache_dir) if cache_dir is not None else kit_cache_dir()) / f"{kind}-v{KIT_VERSION}"


def kit_usage(kit: Path, kind: str) -> str:
    """What `tiny --out` prints: the kit's folder, then the commands that use it (each of its files named by its
    FLUXDEMO_* variable, so nothing is taken from the kit cache)."""
    kit = kit.absolute()
    sources = PRESETS[kind].sources()
    files = " ".join(f"{env}={shlex.quote(str(kit / sources[c].path))}" for env, c in ENV_OVERRIDES.items())
    lora = f"--lora-dir {shlex.quote(str(kit / 'loras'))}"
    return (
        f"{kit}\nThe {kind} kit is ready. Point the model's files at it, then use it as --model {kind}:\n"
        f"  export {files}\n"
        f"  python -m fluxdemo compare --model {kind} {lora} --lora peft --prompt 'a red fox' --out compare/\n"
        f"  python app.py --model {kind} {lora}    # the studio: app.py is in a clone of the repository, not the wheel"
    )
