"""A studio request's model work as values, not closures: the pipeline call an Ask names, and the progress text of
its steps. ZeroGPU hands a GPU function's arguments to its worker process by pickle (spaces' worker queue), so what
crosses is an Ask and a gr.Progress (which spaces relays back to the page); the worker finds the model and the
results cache in what it inherited from the process it was forked from (fluxdemo.studio.zero_gpu.hold)."""

from __future__ import annotations

from collections.abc import Callable

from fluxdemo.pipeline import ResultsCache
from fluxdemo.pipeline.api import Controls, Result, compare, generate, grid, sweep
from fluxdemo.pipeline.model import Model
from fluxdemo.studio.forms import Ask
from fluxdemo.studio.render import STAGE_LABELS


def perform(ask: Ask, manager: Model, controls: Controls, cache: ResultsCache, batch: int) -> Result:
    """The library call of a checked request: compare, generate, sweep or grid."""
    o, stacks = ask.options, ask.stacks
    if ask.kind == "compare":
        return compare(manager, o, stacks[0], controls=controls, cache=cache, batch=batch)
    if ask.kind == "generate":
        return generate(manager, o, stacks[0], controls=controls, cache=cache)
    if ask.kind == "sweep":
        return sweep(manager, o, stacks[0], ask.columns, controls=controls, cache=cache, batch=batch)
    return grid(manager, o, ask.prompts, ask.seeds, stacks, ask.columns, controls=controls, cache=cache, batch=batch)


class StepProgress:
    """A run's progress on the page: "image i of n · LoRA · step x/y", as a share of all the run's steps."""

    def __init__(self, progress: Callable) -> None:
        self._progress = progress
        self._image = (1, 1)

    def on_image(self, i: int, n: int, label: str) -> None:
        self._image = (i, n)

    def on_step(self, stage: str, done: int, total: int) -> None:
        i, n = self._image
        desc = f"image {i} of {n} · {STAGE_LABELS.get(stage, stage)} · step {done}/{total}"
        self._progress(((i - 1) * total + done, n * total), desc=desc)
