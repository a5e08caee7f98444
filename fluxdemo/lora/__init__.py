"""LoRA files: read, judge, convert, find, fetch from the Hub, upload; and put them on the live model (Adapters).

The face of the wing: `from fluxdemo.lora import ...` reaches every public name, wherever in the wing it lives.
Names are imported on first use, so that parsing a LoRA name (lora/names.py) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fluxdemo.lora.adapters import Adapters, LoadedLora
    from fluxdemo.lora.convert import ConvertedLora, inspect_lora, to_diffusers
    from fluxdemo.lora.header import DTYPE_BYTES, MAX_HEADER_BYTES, file_sha256, read_safetensors_header
    from fluxdemo.lora.library import HubLoras, LoraEntry, LoraLibrary
    from fluxdemo.lora.report import REPORT_MAX_ITEMS, LoraReport, bounded, format_report, paths_to_file_names
    from fluxdemo.lora.upload import MAX_UPLOAD_BYTES, check_upload_count, save_upload

# Each module's public names, imported on first use (PEP 562)
_NAMES = {
    "fluxdemo.lora.adapters": ("Adapters", "LoadedLora"),
    "fluxdemo.lora.report": ("bounded", "format_report", "LoraReport", "paths_to_file_names", "REPORT_MAX_ITEMS"),
    "fluxdemo.lora.upload": ("check_upload_count", "MAX_UPLOAD_BYTES", "save_upload"),
    "fluxdemo.lora.convert": ("ConvertedLora", "inspect_lora", "to_diffusers"),
    "fluxdemo.lora.header": ("DTYPE_BYTES", "file_sha256", "MAX_HEADER_BYTES", "read_safetensors_header"),
    "fluxdemo.lora.library": ("HubLoras", "LoraEntry", "LoraLibrary"),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}
__all__ = [
    "Adapters",
    "ConvertedLora",
    "DTYPE_BYTES",
    "HubLoras",
    "LoadedLora",
    "LoraEntry",
    "LoraLibrary",
    "LoraReport",
    "MAX_HEADER_BYTES",
    "MAX_UPLOAD_BYTES",
    "REPORT_MAX_ITEMS",
    "bounded",
    "check_upload_count",
    "file_sha256",
    "format_report",
    "inspect_lora",
    "paths_to_file_names",
    "read_safetensors_header",
    "save_upload",
    "to_diffusers",
]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
