"""Hugging Face ZeroGPU: where the studio's model work runs, and how long it asks the GPU for.

On a ZeroGPU Space, `spaces.GPU` runs the decorated function in a forked process that holds a GPU for at most the
requested seconds; everywhere else (no `spaces` package, or a Space without ZeroGPU) `spaces.GPU` returns the function
unchanged, so one code path serves a laptop, a GPU box and a Space. Import this module before anything touches CUDA:
the `spaces` package must patch torch first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

from fluxdemo.manager import MODEL_COMPONENTS, ModelManager
from fluxdemo.pipeline import Controls, GenerateOptions, Result, compare

try:  # preinstalled on Spaces; optional anywhere else
    import spaces
except ImportError:
    spaces = None

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)

# The duration estimate: FLUX.1-dev Q8_0 GGUF denoises a 1024x1024 image at about 0.16 s/step on an H200 at full
# speed; dequantizing GGUF weights on the fly costs more, so we budget 0.5 s per step and megapixel, plus a fixed
# allowance for moving the components onto the GPU, encoding the prompt, loading the LoRA and decoding.
SECONDS_PER_STEP_MEGAPIXEL = 0.5
FIXED_SECONDS = 30
MAX_SECONDS = 300  # ZeroGPU weighs each ask against the visitor's daily quota (minutes): never ask for more


def on_zero_gpu() -> bool:
    """True on a ZeroGPU Space (which sets SPACES_ZERO_GPU) with the `spaces` package importable."""
    return spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu(duration: Callable[..., float]) -> Callable[[F], F]:
    """`spaces.GPU(duration=...)` where the `spaces` package is installed (itself a no-op off ZeroGPU), else nothing.

    `duration` is called with the decorated function's own arguments and returns the seconds to ask for.
    """
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def gpu_seconds(
    task: Callable[..., Result],
    manager: ModelManager,
    options: GenerateOptions,
    lora: str | None,
    strength: float | list[float],
    controls: Controls,
) -> int:
    """Seconds of GPU a task needs: one denoising loop per image, scaled by steps and image size."""
    images = len(strength) if isinstance(strength, list) else 2 if task is compare else 1  # sweep, compare, generate
    megapixels = options.width * options.height / 2**20
    seconds = FIXED_SECONDS + images * options.steps * megapixels * SECONDS_PER_STEP_MEGAPIXEL
    return min(MAX_SECONDS, round(seconds))


@gpu(duration=gpu_seconds)
def run_on_gpu(
    task: Callable[..., Result],
    manager: ModelManager,
    options: GenerateOptions,
    lora: str | None,
    strength: float | list[float],
    controls: Controls,
) -> Result:
    """Run a library task (pipeline.generate, compare or sweep) with the GPU held for it on ZeroGPU."""
    return task(manager, options, lora, strength, controls)


def preload_for_zero_gpu(manager: ModelManager) -> None:
    """Load every component in the main process. ZeroGPU runs each task in a fresh fork, so whatever a task loads
    is gone when it returns: loading here, once, is what the forks inherit."""
    logger.info("ZeroGPU: loading the model at start-up, so every GPU task inherits it")
    for name in MODEL_COMPONENTS:
        manager.get(name)
