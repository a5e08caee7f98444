"""Who gets into gradio's queue, decided before anything is queued (gradio 6.31's Queue.push).

gradio bounds its queue as a whole: with `max_size` reached, every event is turned away, Cancel and inspect included,
and every value a client sends is kept until its event has run. Here instead:

- each request's values are checked against its input components first (text within the length limit, numbers finite
  and within their slider's range, a dropdown given text), so a 10 MB prompt or a LoRA given as a list is refused
  with a sentence (HTTP 422) before it is queued or kept;
- a request's own rules run next (`Admission.check`): the studio counts a request's LoRAs there, Hub names included,
  so a grid of 64 rows of Hub names is refused before anything is downloaded or queued;
- the model queue ("gpu") holds at most `queue_size` waiting jobs, and a client (a gradio session: a page or a
  gradio_client Client) at most `max_jobs_per_client` queued or running ones;
- every other event has a queue of its own with a bound of its own and a per-client cap of its own, so no flood of
  model jobs can turn away a Cancel, and no one client can fill the Hub's or the uploads' queue.

It also tells a running job that its client has gone: gradio marks the client's events dead when the connection drops,
and the studio polls client_gone() after each denoising step.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import gradio as gr

from fluxdemo.errors import FluxdemoError, OptionsError
from fluxdemo.pipeline.limits import Limits, check_number, check_text, describe

GPU = "gpu"  # the concurrency group of every model job
CHEAP_QUEUE_SIZE = 64  # waiting events per other handler (inspect, refresh, upload): each runs in milliseconds
CHEAP_JOBS_PER_CLIENT = 4  # per other group: a page sends one at a time, so only a script would reach this


class Admission:
    """Installed on one Blocks after demo.queue(): its queue's push goes through admit() first."""

    def __init__(self, blocks: gr.Blocks, limits: Limits, queue_size: int) -> None:
        self.blocks = blocks
        self.limits = limits
        self.queue_size = queue_size
        self._lock = asyncio.Lock()  # the count and the push are one step, or two joins could both take the last place
        self._checks: dict[int, Callable[[list], None]] = {}
        queue = blocks._queue
        self._push = queue.push
        queue.push = self.admit

    @property
    def _queue(self):
        return self.blocks._queue

    def check(self, event, rule: Callable[[list], None]) -> None:
        """Run `rule` on an event's values before it is queued; a FluxdemoError it raises refuses the request with
        its sentence. Rules run in the server's event loop, so they must not read files or the network."""
        self._checks[event["id"]] = rule  # by the event's index: gradio copies each session's functions

    async def admit(self, body, request, username) -> tuple[bool, Any, str]:
        if body.fn_index is None:
            return await self._push(body, request, username)
        from gradio import route_utils

        fn = route_utils.get_fn(self.blocks, None, body)
        problems = input_problems(fn, body.data or [], self.limits)
        rule = self._checks.get(fn._id)
        if not problems and rule is not None:
            try:
                rule(list(body.data or []))
            except FluxdemoError as e:
                problems = [("request", str(e))]
        if problems:
            return False, [_refusal(name, message) for name, message in problems], "validator_error"
        async with self._lock:
            waiting = self._queue.event_queue_per_concurrency_id.get(fn.concurrency_id)
            bound = self.queue_size if fn.concurrency_id == GPU else CHEAP_QUEUE_SIZE
            if waiting is not None and len(waiting.queue) >= bound:
                return False, f"Queue is full. Max size is {bound} and size is {len(waiting.queue)}.", "queue_full"
            mine = self.jobs_of(body.session_hash, fn.concurrency_id)
            if fn.concurrency_id == GPU and mine >= self.limits.max_jobs_per_client:
                message = (
                    f"You have {mine} model jobs queued or running; the limit is "
                    f"{self.limits.max_jobs_per_client} per client (the operator can raise it with "
                    "--max-jobs-per-client or FLUXDEMO_MAX_JOBS_PER_CLIENT). Wait for one to finish, or cancel it."
                )
                return False, [_refusal("request", message)], "validator_error"
            if fn.concurrency_id != GPU and mine >= CHEAP_JOBS_PER_CLIENT:
                message = f"You have {mine} requests of this kind waiting; wait for them to finish, then try again."
                return False, [_refusal("request", message)], "validator_error"
            return await self._push(body, request, username)

    def _events(self, group: str):
        queue = self._queue
        waiting = queue.event_queue_per_concurrency_id.get(group)
        yield from waiting.queue if waiting is not None else ()
        for job in queue.active_jobs:
            yield from (event for event in job or () if event.concurrency_id == group and event.alive)

    def jobs_of(self, session_hash: str | None, group: str = GPU) -> int:
        """The client's events in a concurrency group, waiting or running (those whose client has gone not
        counted)."""
        return sum(event.session_hash == session_hash for event in self._events(group))

    def client_gone(self, session_hash: str) -> bool:
        """True once gradio has marked the session's running model job dead: its client disconnected."""
        running = [e for job in self._queue.active_jobs for e in job or () if e.session_hash == session_hash]
        return bool(running) and not any(e.alive for e in running if e.concurrency_id == GPU)


def input_problems(fn, data: list, limits: Limits) -> list[tuple[str, str]]:
    """(input name, sentence) for each value that its component would not accept from a person."""
    problems = []
    for component, value in zip(fn.inputs, data, strict=False):
        name = getattr(component, "label", None) or type(component).__name__
        try:
            check_input(component, name, value, limits)
        except OptionsError as e:
            problems.append((name, str(e)))
    return problems


def check_input(component: gr.components.Component, name: str, value: object, limits: Limits) -> None:
    """One value against its component: the types a page sends, text within the limit, numbers finite and in range."""
    if value is None:
        return  # an empty field: the handler says which one and what to enter
    if isinstance(component, gr.Textbox):
        check_text(name, value, limits)
    elif isinstance(component, gr.Slider | gr.Number):
        number = check_number(name, value)
        low, high = component.minimum, component.maximum
        if (low is not None and number < low) or (high is not None and number > high):
            raise OptionsError(f"`{name}` must be between {_num(low)} and {_num(high)}, but is {_num(number)}.")
    elif isinstance(component, gr.Dropdown) and not component.multiselect:
        if not isinstance(value, str):
            raise OptionsError(f"`{name}` must be one name (text), but is {describe(value)}.")
        if len(value) > limits.max_prompt_chars:
            raise OptionsError(f"`{name}` is {len(value):,} characters; no name is longer than a prompt.")


def _num(value: float | None) -> str:
    return "any" if value is None else f"{value:g}" if math.isfinite(value) else str(value)


def _refusal(name: str, message: str) -> dict:
    """gradio's shape for a refused input: a 422 whose detail gradio_client and the page show as the sentence."""
    return {"__type__": "validate", "is_valid": False, "message": message, "parameter_name": name}
