"""One request: options -> encode -> denoise -> decode, over the open model (Model); the public API.

The face of the wing: `from fluxdemo.pipeline import generate, compare, ...` as before the wings.
Names are imported on first use, so that reading options.py or limits.py (the CLI's checks of its
arguments) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fluxdemo.pipeline.api import (
        MAX_GRID_CELLS,
        compare,
        encode,
        generate,
        grid,
        grid_pictures,
        initial_noise,
        pipeline_view,
        scaled,
        sweep,
    )
    from fluxdemo.pipeline.cache import DEFAULT_CACHE_IMAGES, ResultsCache
    from fluxdemo.pipeline.experiments import ImageSpec, Result
    from fluxdemo.pipeline.images import difference, params_from_report, save_png, side_by_side
    from fluxdemo.pipeline.model import Model, open_model
    from fluxdemo.pipeline.options import (
        GUIDANCE_MAX,
        MAX_BATCH,
        MAX_GUIDANCE,
        MAX_LORAS_PER_RUN,
        MAX_SEED,
        MAX_SIDE,
        MAX_STACK,
        MAX_STEPS,
        MAX_T5_TOKENS,
        MIN_SIDE,
        PUBLIC_STRENGTH_RANGE,
        SIDE_MULTIPLE,
        STRENGTH_RANGE,
        GenerateOptions,
        LoraChoice,
        Stack,
        as_stack,
        parse_lora,
        parse_stack,
        stack_label,
    )
    from fluxdemo.pipeline.png_settings import ImageParams, PngSettings, read_params, settings_from_png
    from fluxdemo.pipeline.report import GridCell, GridLayout, ImageReport, LoraSummary, LoraUse, ModelInfo, RunReport
    from fluxdemo.pipeline.stages import Controls

# Each module's public names, imported on first use (PEP 562)
_NAMES = {
    "fluxdemo.pipeline.options": (
        "as_stack",
        "GenerateOptions",
        "GUIDANCE_MAX",
        "LoraChoice",
        "MAX_BATCH",
        "MAX_GUIDANCE",
        "MAX_LORAS_PER_RUN",
        "MAX_SEED",
        "MAX_SIDE",
        "MAX_STACK",
        "MAX_STEPS",
        "MAX_T5_TOKENS",
        "MIN_SIDE",
        "parse_lora",
        "parse_stack",
        "PUBLIC_STRENGTH_RANGE",
        "SIDE_MULTIPLE",
        "Stack",
        "stack_label",
        "STRENGTH_RANGE",
    ),
    "fluxdemo.pipeline.api": (
        "compare",
        "encode",
        "generate",
        "grid",
        "grid_pictures",
        "initial_noise",
        "MAX_GRID_CELLS",
        "pipeline_view",
        "scaled",
        "sweep",
    ),
    "fluxdemo.pipeline.stages": ("Controls",),
    "fluxdemo.pipeline.cache": ("DEFAULT_CACHE_IMAGES", "ResultsCache"),
    "fluxdemo.pipeline.images": ("difference", "params_from_report", "save_png", "side_by_side"),
    "fluxdemo.pipeline.png_settings": ("ImageParams", "PngSettings", "read_params", "settings_from_png"),
    "fluxdemo.pipeline.experiments": ("ImageSpec", "Result"),
    "fluxdemo.pipeline.model": ("Model", "open_model"),
    "fluxdemo.pipeline.report": (
        "GridCell",
        "GridLayout",
        "ImageReport",
        "LoraSummary",
        "LoraUse",
        "ModelInfo",
        "RunReport",
    ),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}
__all__ = [
    "GridCell",
    "GridLayout",
    "ImageReport",
    "LoraSummary",
    "LoraUse",
    "ModelInfo",
    "RunReport",
    "Controls",
    "DEFAULT_CACHE_IMAGES",
    "GUIDANCE_MAX",
    "GenerateOptions",
    "ImageParams",
    "ImageSpec",
    "LoraChoice",
    "MAX_BATCH",
    "MAX_GRID_CELLS",
    "MAX_GUIDANCE",
    "MAX_LORAS_PER_RUN",
    "MAX_SEED",
    "MAX_SIDE",
    "MAX_STACK",
    "MAX_STEPS",
    "MAX_T5_TOKENS",
    "MIN_SIDE",
    "Model",
    "PUBLIC_STRENGTH_RANGE",
    "PngSettings",
    "Result",
    "ResultsCache",
    "SIDE_MULTIPLE",
    "STRENGTH_RANGE",
    "Stack",
    "as_stack",
    "compare",
    "difference",
    "encode",
    "generate",
    "grid",
    "grid_pictures",
    "initial_noise",
    "open_model",
    "params_from_report",
    "parse_lora",
    "parse_stack",
    "pipeline_view",
    "read_params",
    "save_png",
    "scaled",
    "settings_from_png",
    "side_by_side",
    "stack_label",
    "sweep",
]


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
