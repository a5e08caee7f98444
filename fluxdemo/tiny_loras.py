"""Sample LoRAs for the tiny kits, one per real key format. (Placeholder: being written by the LoRA work.)"""

from __future__ import annotations

from pathlib import Path


def write_sample_loras(out_dir: Path, transformer_config: dict, clip_config: dict, seed: int = 0) -> dict[str, Path]:
    """Write one sample LoRA per supported format into out_dir; returns {format name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {}
