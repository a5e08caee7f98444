"""Cancel in the studio's handlers, without a browser: the instant note while a job runs, and the job stopping at its
next step. The browser test (test_browser_person.py) may see the job's own later sentence instead on a busy machine,
so the instant one is pinned here."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import gradio as gr
import pytest
from helpers import HANG_S

from fluxdemo.studio import Studio

CANCELLING = "**Cancelling** after the current step; the result on screen stays as it was."
NOTHING_RUNNING = "**Cancelled;** the result on screen stays as it was."


def test_cancel_while_a_job_runs_says_cancelling_after_the_current_step_and_the_job_stops(manager, kit_lora):
    studio = Studio(manager)
    visitor = gr.Request(session_hash="visitor")
    stepped = threading.Event()

    def progress(value, desc: str | None = None) -> None:  # gradio's Progress, as the handler calls it
        if desc and " · step " in desc:
            stepped.set()

    long = dict(prompt="a long run", lora=kit_lora, strength=1.0, seed=1, steps=100, guidance=3.5, width=256,
                height=256, lora_2="", strength_2=1.0, lora_3="", strength_3=1.0, lora_4="", strength_4=1.0,
                fast=False)  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(studio.compare, **long, history=None, request=visitor, progress=progress)
        deadline = time.monotonic() + HANG_S  # a hang guard, not a limit: the wait is for the first step, however late
        while not stepped.wait(0.05):
            assert not job.done(), f"the job ended before its first step: {job.exception()!r}"
            assert time.monotonic() < deadline, f"the long run reported no step in {HANG_S} s"
        assert studio.cancel(visitor) == CANCELLING
        with pytest.raises(gr.Error) as stopped:
            job.result(timeout=HANG_S)
    assert re.fullmatch(r"Cancelled during the baseline image, after step \d+ of 100\.", stopped.value.message)
    assert studio.cancel(visitor) == NOTHING_RUNNING  # the job has let go of its Cancel flag
