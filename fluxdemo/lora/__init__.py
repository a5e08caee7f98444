"""LoRA files: read, judge, convert, find, fetch from the Hub, upload; and put them on the live model (Adapters).

The face of the wing: `from fluxdemo.lora import ...` reaches every public name, wherever in the wing it lives.
"""

from fluxdemo.lora.adapters import Adapters, LoadedLora
from fluxdemo.lora.convert import ConvertedLora, inspect_lora, to_diffusers
from fluxdemo.lora.header import DTYPE_BYTES, MAX_HEADER_BYTES, file_sha256, read_safetensors_header
from fluxdemo.lora.library import HubLoras, LoraEntry, LoraLibrary
from fluxdemo.lora.report import REPORT_MAX_ITEMS, LoraReport, bounded, format_report, paths_to_file_names
from fluxdemo.lora.upload import MAX_UPLOAD_BYTES, check_upload_count, save_upload

__all__ = [
    "DTYPE_BYTES", "MAX_HEADER_BYTES", "MAX_UPLOAD_BYTES", "REPORT_MAX_ITEMS", "Adapters", "ConvertedLora", "HubLoras",
    "LoadedLora", "LoraEntry", "LoraLibrary", "LoraReport", "bounded", "check_upload_count", "file_sha256",
    "format_report", "inspect_lora", "paths_to_file_names", "read_safetensors_header", "save_upload", "to_diffusers",
]  # fmt: skip
