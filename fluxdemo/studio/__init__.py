"""The page, and everything only a page needs: admission, limits on what a visitor sends, history, ZeroGPU.

The face of the wing: `from fluxdemo.studio import build_studio, ...` as before the wings.
"""

from fluxdemo.studio.forms import parse_strengths, read_request, to_options
from fluxdemo.studio.guard import without_paths
from fluxdemo.studio.handlers import DEFAULT_MAX_UPLOAD_BYTES, Studio
from fluxdemo.studio.page import DEFAULT_QUEUE_SIZE, STUDIO_CSS, build_studio
from fluxdemo.studio.render import insert_trigger_words, lora_card

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_QUEUE_SIZE",
    "STUDIO_CSS",
    "Studio",
    "build_studio",
    "insert_trigger_words",
    "lora_card",
    "parse_strengths",
    "read_request",
    "to_options",
    "without_paths",
]
