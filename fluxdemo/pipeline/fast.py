"""--fast: diffusers' TaylorSeer cache on one static schedule (options.FastSchedule), and the steps it really skipped.

Static, not adaptive: First Block Cache and MagCache decide per image which steps to skip, so the baseline and the
LoRA image of a compare would skip different steps and part of their difference would be the cache's. TaylorSeer's
schedule depends on the step count only. It runs in diffusers' "lite" form: on a predicted step every transformer
block is skipped (it returns zeros, unused) and only the output projection is extrapolated, which is the whole saving
of a step for the memory of one output (the full form keeps every attention output: gigabytes at 1024x1024).

The cache is installed for one transformer pass (one image, or one batch) and removed after it, so its state never
outlives the pass: a cancelled run leaves nothing behind, and an exact run never meets the hooks. A batch shares its
steps: the hook counts transformer calls, one per step for the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fluxdemo.pipeline.options import FastSchedule


@contextmanager
def step_cache(transformer: torch.nn.Module, schedule: FastSchedule | None, skipped: list[int] | None) -> Iterator:
    """The TaylorSeer cache on `transformer` for one pass of `schedule` (None: no cache). Once the pass is done,
    `skipped` (when given) receives the steps (from 1) whose blocks did not run, as observed, not as planned."""
    if schedule is None:
        yield
        return
    from diffusers import TaylorSeerCacheConfig

    config = TaylorSeerCacheConfig(
        cache_interval=schedule.cache_interval,
        disable_cache_before_step=schedule.disable_cache_before_step,
        max_order=schedule.max_order,
        taylor_factors_dtype=torch.float32,  # one small output is kept: float32 costs nothing
        use_lite_mode=True,
    )
    calls, ran = [], set()
    # Observed from outside the cache: the transformer's calls (one per step), and the calls in which the first
    # block's own forward ran (the cache's hook wraps it and calls it only on a computed step; compiled ahead of time,
    # that forward is a program whose inner modules call no hooks).
    block = transformer.transformer_blocks[0]
    own, forward = block.__dict__.get("forward"), block.forward

    def watched(*args, **kwargs):
        ran.add(len(calls))
        return forward(*args, **kwargs)

    watch_calls = transformer.register_forward_pre_hook(lambda *_: calls.append(len(calls) + 1))
    try:
        block.forward = watched
        transformer.enable_cache(config)
        yield
        if skipped is not None:
            skipped.extend(step for step in calls if step not in ran)
    finally:
        if transformer.is_cache_enabled:
            transformer.disable_cache()
        watch_calls.remove()
        if own is None:
            del block.forward  # the class's forward again
        else:
            block.forward = own
