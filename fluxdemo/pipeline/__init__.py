"""One request: options -> encode -> denoise -> decode, over the open model (Model); the public API.

The face of the wing: `from fluxdemo.pipeline import generate, compare, ...` as before the wings.
"""

from fluxdemo.pipeline.api import (
    MAX_GRID_CELLS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    SIDE_MULTIPLE,
    Controls,
    GenerateOptions,
    compare,
    encode,
    generate,
    grid,
    grid_pictures,
    initial_noise,
    pipeline_view,
    scaled,
    stack_label,
    sweep,
)
from fluxdemo.pipeline.experiments import ImageSpec, LoraChoice, Result, ResultsCache, Stack, as_stack
from fluxdemo.pipeline.model import Model, open_model

__all__ = [
    "MAX_GRID_CELLS", "MAX_SEED", "MAX_SIDE", "MAX_STEPS", "MIN_SIDE", "SIDE_MULTIPLE", "Controls", "GenerateOptions",
    "ImageSpec", "LoraChoice", "Model", "Result", "ResultsCache", "Stack", "as_stack", "compare", "encode",
    "generate", "grid", "grid_pictures", "initial_noise", "open_model", "pipeline_view", "scaled", "stack_label",
    "sweep",
]  # fmt: skip
