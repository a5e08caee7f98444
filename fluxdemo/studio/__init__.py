"""The page, and everything only a page needs: admission, limits on what a visitor sends, history, ZeroGPU.

The face of the wing: `from fluxdemo.studio import build_studio, ...` as before the wings.
"""

from fluxdemo.studio.page import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_QUEUE_SIZE,
    Studio,
    build_studio,
    insert_trigger_words,
    lora_card,
    parse_strengths,
    read_request,
    to_options,
    without_paths,
)

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_QUEUE_SIZE", "Studio", "build_studio", "insert_trigger_words", "lora_card",
    "parse_strengths", "read_request", "to_options", "without_paths",
]  # fmt: skip
