"""The front: the studio's (or a library caller's) model stays where it is, and its runs are made on Ray Serve
replicas (serve_model sets it as the model's runner).

The front keeps what a run shares across replicas: the results cache (a follow-up compare reuses its baseline, on any
replica), the checks of every option and stack, the report. Each run is split into jobs (plan.split), sent at once
through a DeploymentHandle: Serve's router queues what does not fit (max_ongoing_requests=1 per replica) and sends
a job to a replica that holds its LoRA stack (multiplexing). A replica that dies costs its job one retry elsewhere;
a second death is a sentence. Cancel cancels the jobs' responses; the replicas stop after their current step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ray import serve
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError

from fluxdemo.errors import CancelledError, FluxdemoError, LoraError
from fluxdemo.model.timeline import Timeline
from fluxdemo.pipeline.cache import ResultsCache
from fluxdemo.pipeline.experiments import ImageSpec, Result, _check, _keys, _observed, _report, _reuse
from fluxdemo.pipeline.model import Model
from fluxdemo.pipeline.stages import Controls
from fluxdemo.serve.plan import Job, merge, split
from fluxdemo.serve.replica import Part

logger = logging.getLogger(__name__)

ATTEMPTS = 2  # a job whose replica dies is sent once more, to a live one
POLL_SECONDS = 0.1  # how often the front looks at Cancel while the replicas work


class RayFront:
    """A model's Runner (pipeline.model.Runner) over a Serve application's DeploymentHandle; `jobs` runs at once
    (one per replica: the studio's queue lets that many in)."""

    def __init__(self, handle: serve.handle.DeploymentHandle, replicas: int) -> None:
        self.handle = handle
        self.jobs = replicas
        self.busy: dict[str, str] = {}  # replica -> its Ray actor name, while it runs a job of ours
        self._lock = threading.Lock()  # the results cache, across the runs that go at once

    def run(
        self, manager: Model, specs: Sequence[ImageSpec], controls: Controls, cache: ResultsCache | None, batch: int
    ) -> Result:
        """experiments.run, with step 3 (make what the cache lacks) on the replicas."""
        start, timeline = time.perf_counter(), Timeline()
        specs, resolved = _check(manager, specs, batch)
        with self._lock:
            if cache is not None:
                for r in resolved.values():
                    for entry, _ in r.named:
                        cache.saw(entry.name, entry.sha256)
            keys = _keys(manager, specs, resolved, controls, batch)
            made, reused, todo = _reuse(specs, keys, cache, timeline)
        parts = self._make(split(todo, resolved, batch), batch, controls) if todo else []
        _same_files(manager, resolved, specs, parts)
        by_key = {keys[label]: (image, part.replica) for part in parts for label, image in part.images.items()}
        made.update({key: image for key, (image, _) in by_key.items()})
        with self._lock:
            for spec in todo if cache is not None else ():
                cache.put(keys[spec.label], made[keys[spec.label]])
        made_skipped = {label: part.report.images[label].skipped_steps for part in parts for label in part.images}
        skipped = _observed(specs, keys, {label: steps for label, steps in made_skipped.items() if steps is not None})
        report = _report(manager, specs, resolved, {}, reused, todo, timeline, start, [], skipped)
        if parts:
            replica_of = {s.label: by_key[keys[s.label]][1] for s in specs if s.label not in reused}
            report = merge(report, parts, replica_of, time.perf_counter() - start)
        return Result({spec.label: made[keys[spec.label]] for spec in specs}, report)

    def _make(self, jobs: list[Job], batch: int, controls: Controls) -> list[Part]:
        """Every job at once, each in a thread that reads its stream; this thread hands their events to `controls`
        (gradio's progress belongs to it) and watches Cancel."""
        events: queue.Queue = queue.Queue()
        responses: dict[int, object] = {}
        halt = threading.Event()  # no job sends again once the run is given up
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="fluxdemo-job") as pool:
            futures = [pool.submit(self._job, n, job, batch, controls.cache_scope, events, responses, halt)
                       for n, job in enumerate(jobs)]  # fmt: skip
            try:
                self._watch(futures, events, controls, sum(len(job.specs) for job in jobs))
            except BaseException:
                halt.set()
                for response in list(responses.values()):
                    response.cancel()
                raise
            return [future.result() for future in futures]

    def _watch(self, futures: list[Future], events: queue.Queue, controls: Controls, images: int) -> None:
        """Until every job is done: progress and previews' place in the page, Cancel, the first failure."""
        started = 0
        while not all(f.done() for f in futures) or not events.empty():
            if controls.cancelled and controls.cancelled():
                raise CancelledError("Cancelled: the replicas stop after their current step.")
            failed = next((f for f in futures if f.done() and f.exception()), None)
            if failed is not None:
                raise failed.exception()
            try:
                kind, *event = events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if kind == "image" and controls.on_image:
                started += 1
                controls.on_image(started, images, event[2])
            elif kind == "step" and controls.progress:
                controls.progress(*event)

    def _job(
        self, n: int, job: Job, batch: int, scope: str, events: queue.Queue, responses: dict, halt: threading.Event
    ) -> Part:
        """One job's stream read to its end, on a live replica: a replica that dies costs one retry."""
        for attempt in range(1, ATTEMPTS + 1):
            if halt.is_set():
                break
            options = self.handle.options(stream=True, multiplexed_model_id=job.stack_id)
            responses[n] = response = options.job.remote(job.specs, batch, scope)
            replica = None
            try:
                for event in response:
                    if event[0] == "start":
                        replica, self.busy[event[1]] = event[1], event[2]
                    elif event[0] == "done":
                        return event[1]
                    else:
                        events.put(event)
            except RayActorError as e:
                if attempt == ATTEMPTS:
                    raise FluxdemoError(
                        f"The model replica making {job.specs[0].label} stopped, and so did the one that tried again "
                        f"({type(e).__name__}): the others keep serving; run it again."
                    ) from e
                logger.warning("replica %s stopped during %s; trying once more", replica, job.specs[0].label)
            except RayTaskError as e:  # the replica's own sentence, without Ray's traceback around it
                raise (e.cause if isinstance(e.cause, FluxdemoError) else e) from None
            except TaskCancelledError as e:
                raise CancelledError("Cancelled.") from e
            finally:
                self.busy.pop(replica, None)
        raise CancelledError("Cancelled.")


def _same_files(manager: Model, resolved: dict, specs: list[ImageSpec], parts: list[Part]) -> None:
    """The replicas made their images with the front's model and LoRA files (a machine with another folder would
    make other pictures under the front's cache keys)."""
    shas = {spec.label: [e.sha256 for e, _ in resolved[spec.stack].named] for spec in specs}
    for part in parts:
        if part.report.model.preset != manager.preset.name:
            raise FluxdemoError(
                f"Replica {part.replica} runs the model {part.report.model.preset}, the front "
                f"{manager.preset.name}: start both with the same --model."
            )
        for label, entry in part.report.images.items():
            if [lora.sha256 for lora in entry.loras] != shas[label]:
                raise LoraError(
                    f"Replica {part.replica} read other LoRA files than the front for {label}: every machine needs "
                    "the same LoRA folder (a shared path)."
                )
