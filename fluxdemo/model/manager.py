"""ModelManager: owns the four components and their tokenizers, decides where each lives, and records every move.

One manager per app. A stage asks `with manager.on_device("transformer") as t:`; the strategy says whether the
component goes back to RAM afterwards. The order in which stages ask is the offload order, like diffusers'
`model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"`, but ours also works without an
accelerator (diffusers' enable_model_cpu_offload refuses to start on a CPU-only machine) and logs each move.

Strategies (fluxdemo.model.planner chooses one from the free device memory, or a flag sets it):
- resident: each component goes to the device on first use and stays there.
- model-offload: one component on the device at a time. Between stages the weights wait in RAM, pinned on CUDA; the
  RAM copy is kept while the device copy is in use, so taking a component off the device copies nothing.
- group-offload: as model-offload, but the transformer is streamed block by block by diffusers' group offloading
  (CUDA streams prefetch the next block), for devices that cannot hold the whole transformer.
- disk: as model-offload, but T5 and the transformer are read from their files for their stage and dropped after,
  for machines short of RAM. LoRA adapters are attached again after the transformer is read back.
A device out-of-memory in a stage frees what the stage held, drops to the next lighter strategy and retries it once.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from fluxdemo.errors import OptionsError, OutOfMemoryError
from fluxdemo.model import files, loading, memory, placement, planner, weights
from fluxdemo.model.placement import ComponentState, Move, tensors
from fluxdemo.model.presets import Preset, Source
from fluxdemo.model.timeline import Timeline

logger = logging.getLogger(__name__)

MODEL_COMPONENTS = planner.STAGES
LARGE_COMPONENTS = frozenset(planner.LARGE)
STRATEGIES = planner.STRATEGIES
T = TypeVar("T")


class ComponentWatcher(Protocol):
    """Something that keeps state on the components (the LoRA adapters): told when one is read from its file, when
    one is about to be dropped, and when a request has released them, so the manager needs to know nothing of it."""

    def component_loaded(self, name: str) -> None: ...

    def component_dropping(self, name: str) -> None: ...

    def components_released(self, loaded: Sequence[str]) -> None: ...


@dataclass
class ModelManager:
    """The one owner of the model. `with manager.session(width, height) as timeline:` around a request (the lock)."""

    preset: Preset
    device: torch.device = field(default_factory=lambda: default_device())
    strategy: str = "auto"  # "auto" (the planner decides per request) or one of STRATEGIES
    dtype: torch.dtype | None = None  # compute dtype: bf16 on accelerators, fp32 on CPU unless set
    token: str | None = None
    weights: str = "auto"  # the transformer's weight format: auto (fluxdemo.model.weights chooses) or one of its own
    moves: list[Move] = field(default_factory=list)
    watchers: list[ComponentWatcher] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.dtype is None:
            self.dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.request_strategy(self.strategy)
        self._ceiling: str | None = None  # after an out-of-memory fallback, never plan heavier than this again
        self._lock = threading.RLock()
        self._components: dict[str, ComponentState] = {}
        self._sizes_seen: dict[str, int] = {}  # bytes of each component once loaded, kept after a drop
        self._paths: dict[str, Path] = {}
        self._tokenizers: tuple | None = None
        self._rss_peaks = memory.RssPeaks()  # sampled at each move and stage end
        self._image = (1024, 1024)
        self.timeline = Timeline()
        self.events: list[str] = []  # what went wrong and what the manager did about it, this request
        self.stage_peaks: dict[str, int] = {}  # CUDA: peak allocated bytes per stage, this request
        # A first plan from the preset's figures alone (reading nothing); each request plans again with real sizes.
        self.plan = self._plan(planner.FLUX_DEV, _sizes(self.preset, self._sizes_seen, path=None))
        self.strategy = self.plan.strategy
        self.weights_choice = weights.choose_here(self.weights, self.device, _sizes(self.preset, {}, path=None))
        dtype = str(self.dtype).removeprefix("torch.")
        logger.info(
            "model manager: preset %s on %s (%s), strategy %s", self.preset.name, self.device, dtype, self.strategy
        )

    def request_strategy(self, strategy: str) -> None:
        """'auto' (planned per request) or a fixed strategy, from the next request; self.strategy is what runs now."""
        if strategy != "auto" and strategy not in STRATEGIES:
            raise OptionsError(f"Unknown memory strategy {strategy!r}; choose from auto, {', '.join(STRATEGIES)}.")
        self._requested = strategy

    @property
    def requested_strategy(self) -> str:
        return self._requested

    # -- the lock: one request at a time owns the model -------------------------------------------------------
    @contextmanager
    def session(self, width: int = 1024, height: int = 1024) -> Iterator[Timeline]:
        """Hold the model for one request of a width x height image (planned for its size); its stages go into a fresh
        timeline. Whatever happens inside, the manager comes out clean: each component where the strategy keeps it."""
        with self._lock:
            self.timeline = Timeline()
            self.events = []
            self.stage_peaks = {}
            self._image = (width, height)
            self._replan()
            try:
                yield self.timeline
            except BaseException:
                self._cleanup(failed=True)
                raise
            self._cleanup(failed=False)

    def _cleanup(self, failed: bool) -> None:
        try:
            for watcher in self.watchers:
                watcher.components_released(list(self._components))
        finally:
            if failed:
                self._unstick()
            self.release()

    def release(self) -> None:
        """Put every component where the strategy keeps it between requests (after success, failure or cancel)."""
        for name in list(self._components):
            self._settle(name)

    # -- files and loading -------------------------------------------------------------------------------------
    def path(self, component: str) -> Path:
        if component not in self._paths:
            source = self.preset.sources()[component]
            self._paths[component] = files.resolve(
                source, token=self.token, component=component, preset=self.preset.name
            )
        return self._paths[component]

    def config_dir(self) -> Path:
        return self.path("config_dir")

    def file_identity(self) -> tuple:
        """The preset and each component file's path, size and mtime: a key for results (reads no weights)."""
        files = []
        for component in (*MODEL_COMPONENTS, "tokenizer", "tokenizer_2"):
            path = self.path(component)
            st = path.stat()
            files.append((component, str(path), st.st_size, st.st_mtime_ns))
        return (self.preset.name, str(self.device), str(self.dtype), tuple(files))

    def tokenizers(self):
        if self._tokenizers is None:
            self._tokenizers = loading.load_tokenizers(self.path("tokenizer"), self.path("tokenizer_2"))
        return self._tokenizers

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(loading.read_config(self.config_dir(), "scheduler"))

    def get(self, name: str) -> torch.nn.Module:
        """The component, read from its file on first use or after a drop; on the device under resident."""
        if name not in self._components:
            start = time.perf_counter()
            with self.timeline.stage(f"load {name}"):
                loaded = _LOADERS[name](self.path(name), self.config_dir(), self.dtype)
                module, summary = weights.apply(*loaded, self.weights_choice.format)
            self._components[name] = ComponentState(module, summary, files=loading.file_backed(tensors(module)))
            self._sizes_seen[name] = summary.bytes
            self._log(Move(name, False, loading.module_bytes(module), time.perf_counter() - start, "load"))
            try:  # read (back) from its file: what watchers kept on it is gone
                for watcher in self.watchers:
                    watcher.component_loaded(name)
            except BaseException:
                self._drop(name)
                raise
            if self.strategy == "resident":  # its place from now on: LoRAs attach there, and nothing moves again
                self._onload(name)
        return self._components[name].module

    def loaded(self) -> dict[str, loading.LoadSummary]:
        return {name: state.summary for name, state in self._components.items()}

    # -- placement ---------------------------------------------------------------------------------------------
    @contextmanager
    def on_device(self, name: str) -> Iterator[torch.nn.Module]:
        """The component on the execution device for one stage; afterwards wherever the strategy keeps it."""
        module = self.get(name)
        state = self._components[name]
        if self.strategy != "resident":
            for other in self.on_device_now():  # one at a time; another may be left on by a failure or a switch
                if other != name:
                    self._offload(other)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.strategy == "group-offload" and name == "transformer":
            self._stream(name)
        elif not state.on_device:
            self._onload(name)
        try:
            yield module
        finally:
            self._rss_peaks.sample()  # the stage's weights are paged in and its activations may still be held
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
                self.stage_peaks[name] = max(self.stage_peaks.get(name, 0), peak)
            if state.streaming:  # its hooks took each block off after use
                self._log(Move(name, False, loading.module_bytes(module), 0.0, "stream"))
            self._settle(name)

    def _settle(self, name: str) -> None:  # where the strategy keeps it between stages
        state = self._components.get(name)
        if state is None or state.streaming or self.strategy == "resident":
            return
        if self.strategy == "disk" and name in LARGE_COMPONENTS:
            for watcher in self.watchers:  # so no state outlives the module it lived on
                watcher.component_dropping(name)
            self._drop(name)
        elif state.on_device:
            self._offload(name)

    @property  # pinned RAM copies: ~2x faster asynchronous copies, but memory the kernel cannot take back
    def _pin(self) -> bool:
        return self.plan.ram == "pinned"

    def _onload(self, name: str) -> None:
        start = time.perf_counter()
        state = self._components[name]
        placement.onload(state, self.device, keep=_keeps_host_copy(self.strategy, name), pin=self._pin)
        self._log(Move(name, True, state.bytes, self._synced(start)))

    def _offload(self, name: str) -> None:
        start = time.perf_counter()
        state = self._components[name]
        placement.offload(state, keep=_keeps_host_copy(self.strategy, name), pin=self._pin)
        self._log(Move(name, False, state.bytes, self._synced(start)))

    def _stream(self, name: str) -> None:
        """Group offloading for the transformer: installed once and kept while the strategy is group-offload, because
        installing it pins a RAM copy of every block (seconds for FLUX)."""
        state = self._components[name]
        start = time.perf_counter()
        if not state.streaming:
            if state.off_cpu():
                self._offload(name)
            placement.stream(state, self.device, pin=self._pin)
        self._log(Move(name, True, state.bytes, self._synced(start), "stream"))

    def _unstream(self, name: str) -> None:
        state = self._components[name]
        placement.unstream(state)
        if state.off_cpu():  # a block left on by a failure
            state.on_device = True
            self._offload(name)

    def _drop(self, name: str) -> None:  # the next get() reads it from its file again
        state = self._components.pop(name)
        start, size = time.perf_counter(), state.bytes
        placement.drop(state)
        self._log(Move(name, False, size, self._synced(start), "drop"))

    def _synced(self, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest seconds: host-to-device copies are asynchronous
        return time.perf_counter() - start

    def _log(self, move: Move) -> None:
        self._rss_peaks.sample()
        self.moves.append(move)
        logger.debug("%s %s: %.1f MiB in %.3f s", move.action, move.component, move.bytes / 2**20, move.seconds)

    def on_device_now(self) -> list[str]:
        return [n for n, s in self._components.items() if s.on_device]

    # -- strategy: plan, switch, fall back ---------------------------------------------------------------------
    def _plan(self, arch: planner.Arch, sizes: dict[str, int]) -> planner.Plan:
        # What our components hold counts as available to them, except file views: the kernel already counts page
        # cache as available (pinned copies and dense weights it does not).
        held = sum(s.summary.bytes - (0 if self._pin else memory.nbytes(s.files)) for s in self._components.values())
        mapped = [n for n in MODEL_COMPONENTS if _is_gguf(self.preset.sources()[n])]
        available = memory.ram_available()
        ram_free = None if available is None else available + held
        limits = dict(strategy=self._requested, ceiling=self._ceiling, can_pin=self.device.type == "cuda")
        free = memory.free_device_memory(self.device)
        return planner.plan(
            free, sizes, *self._image, self.dtype, ram_free=ram_free, arch=arch, mapped=mapped, **limits
        )

    def _replan(self) -> None:
        ram = self.plan.ram
        self.plan = self._plan(
            planner.Arch.from_config_dir(self.config_dir()), _sizes(self.preset, self._sizes_seen, self.path)
        )
        logger.info(self.plan.reason)
        if self.plan.strategy != self.strategy or self.plan.ram != ram:
            self._switch(self.plan.strategy, ram_changed=self.plan.ram != ram)

    def _switch(self, strategy: str, ram_changed: bool = False) -> None:
        """Change strategy between stages: undo what the old one installed, then place components for the new one.
        A new RAM strategy (pinned <-> file-backed) drops the RAM copies, which the next move makes the new way."""
        logger.info("memory strategy: %s -> %s, RAM %s", self.strategy, strategy, self.plan.ram)
        self.strategy = strategy
        for name, state in list(self._components.items()):
            if state.streaming and (strategy != "group-offload" or ram_changed):
                self._unstream(name)
            if ram_changed or not _keeps_host_copy(self.strategy, name):
                state.host = None  # the device copy or the module's own tensors are the only copy needed
            if ram_changed and not state.on_device:
                placement.back_to_files(state)
        self.release()

    def _unstick(self) -> None:
        """After a failure: nothing left on the device that the strategy would not keep there."""
        for name, state in list(self._components.items()):
            if state.streaming and state.off_cpu():
                self._unstream(name)  # a failure inside a forward can leave a block on; installed again next stage
        gc.collect()  # the failed stage's activations, held by reference cycles through its frames
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def with_fallback(self, stage: str, run: Callable[[], T], components: Sequence[str]) -> T:
        """Run one stage, which puts `components` on the device; after a device out-of-memory, free what it held and
        run it again, once, with the next lighter strategy; a second is an OutOfMemoryError with the numbers."""
        try:
            return run()
        except torch.OutOfMemoryError as e:  # torch.cuda.OutOfMemoryError is the same class
            first = _first_line(e)
        # Out of the except block, the exception and the frames (and activations) it held are gone.
        failed = self.strategy
        self._ceiling = planner.LIGHTER.get(failed, failed)  # the lightest retries as it is, after freeing the cache
        self._unstick()
        self._replan()  # no heavier than the ceiling from now on; the plan and its numbers go into the report
        self.release()
        event = f"Out of memory in {stage} with {failed} ({first}); freed the device, retrying with {self.strategy}."
        logger.warning(event)
        self.events.append(event)
        try:
            return run()
        except torch.OutOfMemoryError as e:
            second = _first_line(e)
        self._unstick()
        self.release()
        raise OutOfMemoryError(_oom_message(self, stage, components, failed, second))

    def memory_report(self) -> memory.MemoryReport:
        """The plan, what happened, and peaks (fluxdemo.model.memory.memory_report)."""
        return memory.memory_report(
            self.plan, self.strategy, self.events, self.device, self.stage_peaks, self._rss_peaks
        )


def _is_gguf(source: Source) -> bool:
    """Whether a component's file is GGUF: the loaders keep its weights as views of the file."""
    return Path(source.local or source.path).suffix == ".gguf"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_LOADERS = {
    "transformer": loading.load_transformer,
    "text_encoder_2": loading.load_t5,
    "text_encoder": loading.load_clip,
    "vae": loading.load_vae,
}


def _keeps_host_copy(strategy: str, name: str) -> bool:
    """Whether the RAM copy of a component's weights stays while the device copy is in use: yes where it will be
    needed again soon (offloading is then free), no where it would only double the memory."""
    if strategy == "disk":
        return name not in LARGE_COMPONENTS
    return strategy in ("model-offload", "group-offload")


def _sizes(preset: Preset, seen: dict[str, int], path: Callable[[str], Path] | None) -> dict[str, int]:
    """Bytes of each component in memory: measured once loaded, else the preset's figure, else (given `path`, and
    only for files on this machine, never a download) the file's size."""
    sizes = {}
    for name in MODEL_COMPONENTS:
        source = preset.sources()[name]
        if name in seen:
            sizes[name] = seen[name]
        elif source.approx_bytes or path is None or (source.local is None and source.kit is None):
            sizes[name] = source.approx_bytes
        else:
            sizes[name] = path(name).stat().st_size
    return sizes


def _oom_message(manager: ModelManager, stage: str, components: Sequence[str], failed: str, detail: str) -> str:
    width, height = manager._image
    needed = max(manager.plan.stages[part] for part in components)
    free = memory.free_device_memory(manager.device)
    have = f"{free / 2**30:.1f} GiB is free" if free is not None else "its free memory is unknown"
    return (
        f"Out of memory on {manager.device} in the {stage} stage at {width}x{height}, with {failed} and again with "
        f"{manager.strategy}: it needs about {needed / 2**30:.1f} GiB and {have} ({detail}). Close other programs "
        "using the device, make the image smaller, or use a lighter preset such as dev-q4."
    )
