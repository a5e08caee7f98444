"""One Ray Serve replica: one model (open_model) on one device, making the images of the jobs the front sends it.

A job streams its events back (Ray Serve's streaming responses): ("start", replica, actor), then ("image", i, n,
label) and ("step", stage, done, total) as the work goes, then ("done", Part). When the front cancels the response,
the replica's generator is closed and the work stops after its current step (Controls.cancelled).
"""

from __future__ import annotations

import asyncio
import os
import platform
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from ray import serve

from fluxdemo.lora import HubLoras
from fluxdemo.lora.compile_options import CompileSettings
from fluxdemo.model.presets import Preset
from fluxdemo.pipeline.experiments import ImageSpec, run
from fluxdemo.pipeline.model import open_model
from fluxdemo.pipeline.report import RunReport
from fluxdemo.pipeline.stages import Controls

# The stacks a replica says it holds, for Ray Serve's routing: a LoRA adapter stays loaded on the replica's model
# (lora/adapters.py keeps 4), so a job sent where its stack last ran skips reading and converting the file.
STACKS_KEPT = 4


@dataclass(frozen=True)
class ModelSpec:
    """What each replica opens: the front's preset and model flags (the device is the replica's own)."""

    preset: Preset
    strategy: str = "auto"
    lora_dir: str = "loras"
    hub_loras: HubLoras = HubLoras()
    threads: int | None = None  # torch threads on a CPU replica (None: torch's default)
    weights: str = "auto"  # --weights
    compile: CompileSettings | None = None  # --compile: each replica compiles its own transformer once


@dataclass
class Part:
    """What a job made: its images by label and experiments.run's report, and the replica that made them."""

    replica: str
    actor: str  # the replica's Ray actor name (namespace "serve"), e.g. to stop it
    images: dict[str, Image.Image]
    report: RunReport


class FluxReplica:
    """The deployment's class (replica.deployment() wraps it): one model, one job at a time."""

    def __init__(self, spec: ModelSpec) -> None:
        if spec.threads:  # before any torch work: the reduction order, and so the pixels, depend on it
            torch.set_num_threads(spec.threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to its GPU
        self.model = open_model(
            spec.preset,
            device=device,
            strategy=spec.strategy,
            lora_dir=spec.lora_dir,
            hub_loras=spec.hub_loras,
            weights=spec.weights,
            compile=spec.compile,
        )
        replica_id = serve.get_replica_context().replica_id
        self.name = f"{replica_id.unique_id}@{platform.node()}:{os.getpid()}"
        self.actor = replica_id.to_full_id_str()

    @serve.multiplexed(max_num_models_per_replica=STACKS_KEPT)
    async def stack(self, stack_id: str) -> str:
        """The routing hint alone: the LoRAs themselves load in the job, under the model's lock, like a local run."""
        return stack_id

    async def job(self, specs: Sequence[ImageSpec], batch: int, scope: str) -> AsyncIterator[tuple]:
        """Make `specs` (experiments.run, no results cache: the front keeps it), streaming the events."""
        await self.stack(serve.get_multiplexed_model_id())
        loop, events, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def tell(*event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        controls = Controls(
            progress=lambda stage, done, total: tell("step", stage, done, total),
            cancelled=stop.is_set,
            on_image=lambda i, n, label: tell("image", i, n, label),
            cache_scope=scope,
        )
        work = asyncio.ensure_future(asyncio.to_thread(run, self.model, specs, controls, None, batch))
        try:
            yield ("start", self.name, self.actor)
            while not work.done() or not events.empty():
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, work}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield get.result()
                else:
                    get.cancel()
            result = work.result()
            yield ("done", Part(self.name, self.actor, result.images, result.report))
        finally:  # cancelled by the front, or the front has gone: the work stops after its step
            stop.set()


def deployment(spec: ModelSpec, replicas: int, gpus: bool):
    """The Serve application: `replicas` replicas, each one GPU (`gpus`) or `spec.threads` CPUs, one job at a time
    (more wait in Serve's queue: its back-pressure)."""
    resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": spec.threads or 1}
    return (
        serve.deployment(FluxReplica)
        .options(num_replicas=replicas, max_ongoing_requests=1, ray_actor_options=resources)
        .bind(spec)
    )
