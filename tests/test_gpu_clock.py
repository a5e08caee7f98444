"""How many GPU seconds a ZeroGPU task asks for (issue 19): the derived prior until a path has run, then the pace
its own runs measured, never less than the slowest recent run, per weight format."""

from __future__ import annotations

import dataclasses
import math
import pickle
import re

import numpy as np
import pytest

from fluxdemo.pipeline import GenerateOptions, LoraChoice, ResultsCache, compare
from fluxdemo.pipeline.api import Controls
from fluxdemo.pipeline.model import Model
from fluxdemo.studio import zero_gpu
from fluxdemo.studio.forms import Ask
from fluxdemo.studio.zero_gpu import MARGIN, MAX_SECONDS, TASK_START_SECONDS, StepClock, ask_seconds

OPTS = GenerateOptions("a clock on a tower", seed=5, steps=3, width=32, height=16)
DEFAULT_COMPARE = GenerateOptions("a cat", steps=28, width=1024, height=1024)


@pytest.fixture()
def clock(monkeypatch) -> StepClock:
    fresh = StepClock()
    monkeypatch.setattr(zero_gpu, "CLOCK", fresh)
    return fresh


@dataclasses.dataclass
class Host:
    """What a studio gives its jobs (zero_gpu.Host)."""

    manager: Model
    cache: ResultsCache = dataclasses.field(default_factory=lambda: ResultsCache(8))
    batch: int = 1


class Told:
    """gradio's progress as a job sees it: called with (done, total) and a description; pickled like gr.Progress."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, progress, desc: str) -> None:
        self.calls.append((progress, desc))


def step_seconds(report) -> float:
    return sum(s.seconds for s in report.timeline if re.search(r" step \d+/\d+$", s.name))


def test_before_any_run_a_default_compare_asks_the_derived_prior(clock):
    # 15 s fixed + 2 images x 28 steps x 1 megapixel x 1.2 s = 82.2 s
    assert ask_seconds(None, DEFAULT_COMPARE, 2) == 83
    assert ask_seconds(None, DEFAULT_COMPARE, 1) == 49  # 15 + 33.6
    assert ask_seconds(None, GenerateOptions("a", steps=100, width=2048, height=2048), 8) == MAX_SECONDS


def test_after_a_run_its_path_asks_what_the_run_measured(clock, manager, kit_lora):
    host = Host(manager)
    ask = Ask("compare", OPTS, ((LoraChoice(kit_lora, 0.8),),))
    report = zero_gpu.run_measured(host, zero_gpu.hold(host), ask, Controls(), Told()).report
    clock.record(dataclasses.replace(report, batches=[]))  # a run whose images all came from the cache
    [(path, runs)] = clock._runs.items()
    assert path == (manager.weights_choice.format, "eager") == ("gguf", "eager") and len(runs) == 1
    images = sum(len(batch) for batch in report.batches)
    assert images == 2 and report.reused == []
    # each step carries the image's 32x16 pixels and the prompt's 935 x 256 pixels' worth of tokens
    per_unit = step_seconds(report) / (images * OPTS.steps * (32 * 16 + 935 * 256) / 2**20)
    fixed = report.seconds - step_seconds(report)
    assert runs[0] == zero_gpu.Pace(pytest.approx(per_unit), pytest.approx(fixed))

    want = math.ceil(TASK_START_SECONDS + MARGIN * (fixed + 2 * 28 * (1 + 935 * 256 / 2**20) * per_unit))
    assert ask_seconds(manager, DEFAULT_COMPARE, 2) == min(MAX_SECONDS, want)
    assert clock.seconds(DEFAULT_COMPARE, 2, ("bf16", "eager")) == 83  # another format has not run: still the prior


def test_a_faster_run_does_not_shrink_the_ask_below_the_slowest_recent_one(clock, manager, kit_lora):
    report = compare(manager, dataclasses.replace(OPTS, seed=6), kit_lora, 0.8).report
    clock.record(report)
    before = clock.seconds(DEFAULT_COMPARE, 2, ("gguf", "eager"))
    faster = [dataclasses.replace(s, seconds=s.seconds / 10) for s in report.timeline]
    clock.record(dataclasses.replace(report, timeline=faster, seconds=report.seconds / 10))
    assert clock.seconds(DEFAULT_COMPARE, 2, ("gguf", "eager")) == before
    for _ in range(zero_gpu.RUNS_KEPT):  # once the slow run is out of the last RUNS_KEPT, the ask follows
        clock.record(dataclasses.replace(report, timeline=faster, seconds=report.seconds / 10))
    assert clock.seconds(DEFAULT_COMPARE, 2, ("gguf", "eager")) < before


def test_a_zero_gpu_job_crosses_to_its_worker_by_pickle_and_draws_what_runs_here(manager, kit_lora):
    """spaces pickles a GPU function's arguments into its worker and the result back: the job goes as the studio's
    key, the request and gradio's progress, and the worker (here, this process) finds the model by the key."""
    host = Host(manager)
    ask = Ask("compare", dataclasses.replace(OPTS, seed=8), ((LoraChoice(kit_lora, 0.8),),))
    sent = pickle.loads(pickle.dumps((zero_gpu.hold(host), ask, "", Told())))  # as spaces' worker queue sends them
    result = pickle.loads(pickle.dumps(zero_gpu._run_in_task(*sent)))
    here = compare(manager, ask.options, kit_lora, 0.8)
    for label in ("baseline", "lora"):
        assert np.array_equal(np.asarray(result.images[label]), np.asarray(here.images[label]))
    last = [((5, 6), "image 2 of 2 · LoRA · step 2/3"), ((6, 6), "image 2 of 2 · LoRA · step 3/3")]
    assert sent[3].calls[-2:] == last  # the progress the page shows, relayed by spaces
