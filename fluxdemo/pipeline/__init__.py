"""One request: options -> encode -> denoise -> decode, over the open model (Model); the public API.

The face of the wing: `from fluxdemo.pipeline import generate, compare, ...` as before the wings.
"""

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
from fluxdemo.pipeline.stages import Controls

__all__ = [
    "ImageParams",
    "PngSettings",
    "difference",
    "params_from_report",
    "read_params",
    "save_png",
    "settings_from_png",
    "side_by_side",
    "DEFAULT_CACHE_IMAGES",
    "GUIDANCE_MAX",
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
    "PUBLIC_STRENGTH_RANGE",
    "SIDE_MULTIPLE",
    "STRENGTH_RANGE",
    "Controls",
    "GenerateOptions",
    "ImageSpec",
    "LoraChoice",
    "Model",
    "Result",
    "ResultsCache",
    "Stack",
    "as_stack",
    "compare",
    "encode",
    "generate",
    "grid",
    "grid_pictures",
    "initial_noise",
    "open_model",
    "parse_lora",
    "parse_stack",
    "pipeline_view",
    "scaled",
    "stack_label",
    "sweep",
]
