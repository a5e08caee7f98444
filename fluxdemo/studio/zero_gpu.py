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

from fluxdemo.model.manager import MODEL_COMPONENTS
from fluxdemo.pipeline.api import Controls, GenerateOptions, Result
from fluxdemo.pipeline.model import Model
from fluxdemo.pipeline.options import steps_run
from fluxdemo.pipeline.previews import DrawPreview, TinyDecoder, latent_preview

try:  # preinstalled on Spaces; optional anywhere else
    import spaces
except ImportError:
    spaces = None

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)

# ZeroGPU's documented placement (hub-docs spaces-zerogpu.md, "Model loading"): models go to `cuda` at start-up in
# the main process, where CUDA is emulated, and a @spaces.GPU function neither loads nor moves them. Its default
# `large` slice is half an RTX PRO 6000 Blackwell with 48 GB: dev-q8 resident at 1024x1024 needs about 20 GB (the
# planner's prediction, bench/RESULTS.md), so every component stays on the device for the app's life.
ZERO_GPU_DEVICE = "cuda"
ZERO_GPU_STRATEGY = "resident"

# The duration estimate, derived for that slice. One FLUX.1-dev step at 1024x1024 (4096 image + 512 text tokens
# through 12 B parameters) is about 125 TFLOP. A full RTX PRO 6000 Blackwell does about 500 TFLOP/s of dense bf16
# (NVIDIA's 4 PFLOPS is sparse FP4: / 2 dense, / 4 from FP4 to bf16); half a card about 250 TFLOP/s, so 0.5 s per
# step and megapixel at full use. Eager PyTorch with GGUF weights dequantized per layer and step reaches roughly
# 40-50% of that, hence 1.2 s. Attention grows faster than the pixel count, but up to 1024x1024 the 125 TFLOP
# already holds it. Fixed: CUDA start-up in the forked task, taking over the resident weights, encoding the prompt
# (T5-XXL: about 5 TFLOP for 512 tokens), loading a LoRA (milliseconds) and decoding (the VAE, about 1 s at 1 MP);
# nothing is loaded or moved any more, so 15 s instead of the 30 s the H200 estimate kept for moving components.
SECONDS_PER_STEP_MEGAPIXEL = 1.2
FIXED_SECONDS = 15
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
    task: Callable[[Model, Controls], Result],
    manager: Model,
    options: GenerateOptions,
    images: int,
    controls: Controls,
) -> int:
    """Seconds of GPU a task needs: one denoising loop per image, scaled by the steps that run (--fast predicts some)
    and the image size."""
    megapixels = options.width * options.height / 2**20
    seconds = FIXED_SECONDS + images * steps_run(options) * megapixels * SECONDS_PER_STEP_MEGAPIXEL
    return min(MAX_SECONDS, round(seconds))


@gpu(duration=gpu_seconds)
def run_on_gpu(
    task: Callable[[Model, Controls], Result],
    manager: Model,
    options: GenerateOptions,
    images: int,
    controls: Controls,
) -> Result:
    """Run a library task (a pipeline call with its arguments bound) with the GPU held for it on ZeroGPU, for as long
    as `images` images of `options`' steps and size need."""
    return task(manager, controls)


def preload_for_zero_gpu(manager: Model, draw: DrawPreview = latent_preview) -> None:
    """Load every component in the main process and place it on the device for good (a manager built with
    ZERO_GPU_DEVICE and ZERO_GPU_STRATEGY), the preview decoder too. ZeroGPU runs each task in a fresh fork, so
    whatever a task loads is gone when it returns, and moves inside a task are slow: placed here, once, the forks
    inherit everything and move nothing."""
    logger.info(
        "ZeroGPU: every component to %s at start-up (%s); GPU tasks move nothing", manager.device, manager.strategy
    )
    for name in MODEL_COMPONENTS:
        manager.get(name)
    if isinstance(draw, TinyDecoder):
        draw.vae.to(manager.device)
