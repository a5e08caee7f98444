"""LoRA files: read, judge, convert, find, fetch from the Hub, upload; and put them on the live model (Adapters).

The face of the wing: `from fluxdemo.lora import ...` reaches every public name, wherever in the wing it lives.
"""

from fluxdemo.lora.adapters import Adapters, LoadedLora
from fluxdemo.lora.library import (
    DTYPE_BYTES,
    MAX_HEADER_BYTES,
    MAX_UPLOAD_BYTES,
    REPORT_MAX_ITEMS,
    ConvertedLora,
    HubLoras,
    LoraEntry,
    LoraLibrary,
    LoraReport,
    bounded,
    check_upload_count,
    file_sha256,
    format_report,
    inspect_lora,
    paths_to_file_names,
    read_safetensors_header,
    save_upload,
    to_diffusers,
)

__all__ = [
    "DTYPE_BYTES", "MAX_HEADER_BYTES", "MAX_UPLOAD_BYTES", "REPORT_MAX_ITEMS", "Adapters", "ConvertedLora", "HubLoras",
    "LoadedLora", "LoraEntry", "LoraLibrary", "LoraReport", "bounded", "check_upload_count", "file_sha256",
    "format_report", "inspect_lora", "paths_to_file_names", "read_safetensors_header", "save_upload", "to_diffusers",
]  # fmt: skip
