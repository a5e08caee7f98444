"""Hugging Face ZeroGPU: where the studio's model work runs, and how long it asks the GPU for.

On a ZeroGPU Space, `spaces.GPU` runs the decorated function in a forked process that holds a GPU for at most the
requested seconds; everywhere else (no `spaces` package, or a Space without ZeroGPU) `spaces.GPU` returns the function
unchanged, so one code path serves a laptop, a GPU box and a Space. Import this module before anything touches CUDA:
the `spaces` package must patch torch first.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from threading import Lock
from typing import Protocol, TypeVar
from weakref import WeakValueDictionary

from fluxdemo.lru import LRU
from fluxdemo.model.manager import MODEL_COMPONENTS
from fluxdemo.pipeline import ResultsCache
from fluxdemo.pipeline.api import Controls, GenerateOptions, Result, generate
from fluxdemo.pipeline.limits import MEGAPIXEL, STEP_FIXED_PIXELS
from fluxdemo.pipeline.model import Model
from fluxdemo.pipeline.options import steps_run
from fluxdemo.pipeline.previews import DrawPreview, TinyDecoder, latent_preview
from fluxdemo.pipeline.report import RunReport
from fluxdemo.studio.forms import Ask
from fluxdemo.studio.work import StepProgress, perform

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
# Once a path has run, its own figures replace that prior: the slowest of its last RUNS_KEPT runs, times MARGIN
# (ZeroGPU stops a task at its ask, so an ask a little long costs quota and one too short costs the pictures), plus
# TASK_START_SECONDS for what no run report sees: the fork and its CUDA context.
RUNS_KEPT = 5
MARGIN = 1.25
TASK_START_SECONDS = 5
# --compile on a Space: the ZeroGPU AoT guide asks 1500 s for its start-up compile of FLUX; the two block programs
# take minutes, once per Space start, and no visitor's quota pays for them.
AOT_COMPILE_SECONDS = 1500
PATHS_KEPT = 16  # paths are few (formats x speed settings); a bound all the same


@dataclass(frozen=True)
class Pace:
    """How fast one path ran: denoising seconds per unit of step work (one image's step at one megapixel of image
    and prompt tokens, as fluxdemo.pipeline.limits counts them), and the rest of the run's seconds."""

    step_unit_seconds: float
    fixed_seconds: float


def step_units(options: GenerateOptions, images: int) -> float:
    """The denoising work of `images` images: each step that runs (--fast predicts some) carries the image's tokens
    and the prompt's."""
    return images * steps_run(options) * (options.width * options.height + STEP_FIXED_PIXELS) / MEGAPIXEL


# the derivation above is for a 1024x1024 step, prompt tokens included
PRIOR = Pace(
    SECONDS_PER_STEP_MEGAPIXEL / step_units(GenerateOptions("", steps=1, width=1024, height=1024), 1),
    FIXED_SECONDS - TASK_START_SECONDS,
)


def path_of(weights: str | None, compiled: bool) -> tuple[str, ...]:
    """What sets a run's pace besides its size and steps: the transformer's weight format, and --compile."""
    return (weights or "gguf", "compiled" if compiled else "eager")


def pace_of(report: RunReport) -> Pace | None:
    """The pace a finished run shows in its timeline; None when it denoised nothing (every image reused)."""
    units = step_units(report.options, sum(len(batch) for batch in report.batches))
    if not units:
        return None
    stepping = sum(stage.seconds for stage in report.timeline if _is_step(stage.name))
    return Pace(stepping / units, max(0.0, report.seconds - stepping))


def _is_step(stage: str) -> bool:
    """A denoising step's timeline entry, "<label> step 3/28" (a label is a LoRA's or a cell's name: any text)."""
    done, _, total = stage.rpartition(" step ")[2].partition("/")
    return " step " in stage and done.isdigit() and total.isdigit()


class StepClock:
    """The seconds a ZeroGPU task asks for, from the measured pace of its path (PRIOR until the path has run)."""

    def __init__(self) -> None:
        self._runs = LRU(PATHS_KEPT)  # path -> deque of its last RUNS_KEPT paces
        self._lock = Lock()  # finished jobs record while other visitors' asks are sized

    def record(self, report: RunReport) -> None:
        if (pace := pace_of(report)) is not None:
            with self._lock:
                path = path_of(report.model.weights, bool(report.model.compiled))
                runs = self._runs.get(path) or deque(maxlen=RUNS_KEPT)
                runs.append(pace)
                self._runs.put(path, runs)

    def pace(self, path: tuple[str, ...]) -> tuple[Pace, float]:
        """The pace to plan with and its margin: the slowest recent run of the path, or the prior."""
        with self._lock:
            runs = list(self._runs.get(path) or ())
        if not runs:
            return PRIOR, 1.0
        return Pace(max(r.step_unit_seconds for r in runs), max(r.fixed_seconds for r in runs)), MARGIN

    def seconds(self, options: GenerateOptions, images: int, path: tuple[str, ...]) -> int:
        pace, margin = self.pace(path)
        planned = pace.fixed_seconds + step_units(options, images) * pace.step_unit_seconds
        return min(MAX_SECONDS, math.ceil(TASK_START_SECONDS + margin * planned))


CLOCK = StepClock()  # one per server: every visitor's runs teach it, none can make it ask for less than they took


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


class Host(Protocol):
    """What a model job runs on: a Studio (fluxdemo.studio.handlers)."""

    manager: Model
    cache: ResultsCache
    batch: int


def hold(host: Host | Model) -> int:
    """A key by which a ZeroGPU worker, forked from this process, finds `host`: spaces pickles a GPU function's
    arguments to send them to the worker, and a model (its locks, its modules on the GPU) cannot be pickled."""
    key = next(_KEYS)
    _HELD[key] = host
    return key


_HELD: WeakValueDictionary[int, Host | Model] = WeakValueDictionary()  # a closed studio is not kept alive here
_KEYS = itertools.count()


def ask_seconds(manager: Model | None, options: GenerateOptions, images: int) -> int:
    """Seconds of GPU a job needs: one denoising loop per image, scaled by the steps that run (--fast predicts some)
    and the image size, at the pace its path last ran (StepClock)."""
    return CLOCK.seconds(options, images, job_path(manager, options))


def job_path(manager: Model | None, options: GenerateOptions) -> tuple[str, ...]:
    """The path a job of `options` runs on: compiled ahead of time and frozen (compile_ahead), only the size compiled
    at start-up runs its programs, any other eager."""
    if manager is None:
        return path_of(None, False)
    ahead = manager.adapters.ahead_of_time
    covered = ahead is None or not ahead.frozen or (options.width, options.height) in ahead.sizes
    return path_of(manager.weights_choice.format, manager.compile is not None and covered)


def gpu_seconds(key: int, ask: Ask, scope: str, progress: Callable) -> int:
    """ask_seconds of a job, with _run_in_task's arguments (spaces calls it so)."""
    return ask_seconds(_HELD[key].manager, ask.options, ask.images)


@gpu(duration=gpu_seconds)
def _run_in_task(key: int, ask: Ask, scope: str, progress: Callable) -> Result:
    """A job in the ZeroGPU worker, from picklable arguments: the studio's key, the request, whose caches (a public
    app's scope) and gradio's progress, which spaces relays to the page. The worker sees no Cancel (the page's flag
    lives in the main process) and draws no live preview."""
    host = _HELD[key]
    steps = StepProgress(progress)
    controls = Controls(progress=steps.on_step, on_image=steps.on_image, cache_scope=scope)
    return perform(ask, host.manager, controls, host.cache, host.batch)


def run_measured(host: Host, key: int, ask: Ask, controls: Controls, progress: Callable) -> Result:
    """A model job on the GPU and its pace recorded here: on ZeroGPU in its worker (`key`: hold(host)), for as long as
    its images need; anywhere else in this process, with `controls` (Cancel, previews, progress)."""
    if on_zero_gpu():
        result = _run_in_task(key, ask, controls.cache_scope, progress)
    else:
        result = perform(ask, host.manager, controls, host.cache, host.batch)
    CLOCK.record(result.report)
    return result


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


@gpu(duration=lambda key, options: AOT_COMPILE_SECONDS)
def _compile_in_task(key: int, options: GenerateOptions) -> dict:
    manager = _HELD[key]
    generate(manager, replace(options, steps=1))  # one step meets every block class at this size
    return manager.adapters.ahead_of_time.programs()


def compile_ahead(manager: Model, options: GenerateOptions) -> None:
    """--compile on a ZeroGPU Space (where torch.compile does not run): the block programs for `options`' size,
    compiled ahead of time in one GPU task at start-up and handed back to this process, which the job workers fork
    from; other sizes then run eager rather than compile inside a visitor's task. Elsewhere the same, in-process."""
    ahead = manager.adapters.ahead_of_time
    if ahead is None:
        return
    logger.info("ZeroGPU: compiling the transformer's blocks ahead of time for %dx%d", options.width, options.height)
    ahead.adopt(_compile_in_task(hold(manager), options))
    ahead.sizes.add((options.width, options.height))
    ahead.frozen = True
