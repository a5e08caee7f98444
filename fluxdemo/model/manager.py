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
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from fluxdemo.errors import OptionsError, OutOfMemoryError
from fluxdemo.model import files, loading, planner
from fluxdemo.model.presets import Preset, Source
from fluxdemo.model.timeline import Timeline

logger = logging.getLogger(__name__)

MODEL_COMPONENTS = planner.STAGES
LARGE_COMPONENTS = frozenset(planner.LARGE)
STRATEGIES = planner.STRATEGIES
T = TypeVar("T")

# diffusers has no public "disable group offloading"; these are the hooks its own
# _maybe_remove_and_reapply_group_offloading removes before applying it again.
_GROUP_OFFLOAD_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")


@dataclass(frozen=True)
class Move:
    """One component moving on or off the execution device, read from its file, or dropped. Logged even when the
    device is the CPU, so a strategy's order of moves is the same (and testable) on every machine."""

    component: str
    onload: bool  # True: to the execution device; False: back to RAM (or, for "drop", out of memory altogether)
    bytes: int
    seconds: float
    kind: str = "move"  # "move": copied; "stream": group offloading streams it during the stage; "load"; "drop"

    @property
    def action(self) -> str:
        """'on', 'off', 'stream on', 'stream off', 'load' or 'drop'."""
        if self.kind in ("load", "drop"):
            return self.kind
        direction = "on" if self.onload else "off"
        return f"stream {direction}" if self.kind == "stream" else direction


@dataclass
class ComponentState:
    module: torch.nn.Module
    summary: loading.LoadSummary
    on_device: bool = False
    streaming: bool = False  # group offloading hooks installed (the transformer under group-offload)
    host: dict[str, torch.Tensor] | None = None  # RAM copy of every tensor, kept while the device copy is in use
    # The weights that are views of their file's memory map (GGUF), by name: a RAM copy that costs no anonymous
    # memory, from which a component can go to the device again and again (file-backed), or be pinned (pinned).
    files: dict[str, torch.Tensor] = field(default_factory=dict)


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
        self._rss_peaks = {"RssAnon": 0, "RssFile": 0}  # sampled at each move and stage end (the kernel keeps no peak)
        self._image = (1024, 1024)
        self.timeline = Timeline()
        self.events: list[str] = []  # what went wrong and what the manager did about it, this request
        self.stage_peaks: dict[str, int] = {}  # CUDA: peak allocated bytes per stage, this request
        # A first plan from the preset's figures alone (reading nothing); each request plans again with real sizes.
        self.plan = self._plan(planner.FLUX_DEV, self._sizes(files=False))
        self.strategy = self.plan.strategy
        logger.info("model manager: preset %s on %s (%s), strategy %s", self.preset.name, self.device,
                    str(self.dtype).removeprefix("torch."), self.strategy)  # fmt: skip

    def request_strategy(self, strategy: str) -> None:
        """What the user asks for: "auto" (planned per request) or a fixed strategy; it applies from the next
        request (self.strategy is what runs now, which an out-of-memory fallback may have lowered)."""
        if strategy != "auto" and strategy not in STRATEGIES:
            raise OptionsError(f"Unknown memory strategy {strategy!r}; choose from auto, {', '.join(STRATEGIES)}.")
        self._requested = strategy

    @property
    def requested_strategy(self) -> str:
        return self._requested

    # -- the lock: one request at a time owns the model -------------------------------------------------------
    @contextmanager
    def session(self, width: int = 1024, height: int = 1024) -> Iterator[Timeline]:
        """Hold the model for one request of a width x height image; its stages go into a fresh timeline.

        The strategy is planned for this image size (under "auto"). Whatever happens inside (success, failure,
        cancellation), the manager comes out clean: no LoRA active, each component where the strategy keeps it.
        """
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
        """What identifies the model's weights on disk: the preset and, per component, its file's path, size and
        modification time (a key for results computed with them; resolving reads no weights)."""
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
        """The component, loaded from its file on first use (and again after the disk strategy dropped it), and
        placed: on the device under resident, in RAM otherwise."""
        if name not in self._components:
            loader = {
                "transformer": loading.load_transformer,
                "text_encoder_2": loading.load_t5,
                "text_encoder": loading.load_clip,
                "vae": loading.load_vae,
            }[name]
            start = time.perf_counter()
            with self.timeline.stage(f"load {name}"):
                module, summary = loader(self.path(name), self.config_dir(), self.dtype)
            self._components[name] = ComponentState(module, summary, files=loading.file_backed(_tensors(module)))
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
            self._sample_rss()  # the stage's weights are paged in and its activations may still be held
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
                self.stage_peaks[name] = max(self.stage_peaks.get(name, 0), peak)
            if state.streaming:  # its hooks took each block off after use
                self._log(Move(name, False, loading.module_bytes(module), 0.0, "stream"))
            self._settle(name)

    def _settle(self, name: str) -> None:
        """Put one component where the strategy keeps it between stages."""
        state = self._components.get(name)
        if state is None or state.streaming or self.strategy == "resident":
            return
        if self.strategy == "disk" and name in LARGE_COMPONENTS:
            for watcher in self.watchers:  # so no state outlives the module it lived on
                watcher.component_dropping(name)
            self._drop(name)
        elif state.on_device:
            self._offload(name)

    def _keeps_host_copy(self, name: str) -> bool:
        """Whether the RAM copy of a component's weights stays while the device copy is in use: yes where it will be
        needed again soon (offloading is then free), no where it would only double the memory."""
        if self.strategy == "disk":
            return name not in LARGE_COMPONENTS
        return self.strategy in ("model-offload", "group-offload")

    @property
    def _pin(self) -> bool:
        """Whether the RAM copies are pinned (the plan's RAM strategy): pinned RAM makes host-to-device copies
        asynchronous and about 2x faster, but it is anonymous memory the kernel cannot take back."""
        return self.plan.ram == "pinned"

    def _host(self, state: ComponentState, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A RAM tensor for a weight: its view of the file where it has one, else itself when in RAM, else a copy;
        pinned (a copy) under the pinned RAM strategy."""
        source = state.files.get(key)
        if source is None or source.shape != tensor.shape:
            source = tensor if tensor.device.type == "cpu" else tensor.to("cpu")
        return source.pin_memory() if self._pin and not source.is_pinned() else source

    def _onload(self, name: str) -> None:
        state = self._components[name]
        start = time.perf_counter()
        state.on_device = True  # first: if a copy fails half-way (out of memory), release() still takes it off
        keep = self._keeps_host_copy(name)
        host = state.host or {}
        kept: dict[str, torch.Tensor] = {}
        # Swap .data as module.to() does, but from the kept RAM copy: quantized (GGUF, quanto) modules refuse a dtype
        # cast, and a copy that stays in RAM makes the trip back free.
        for key, tensor in _tensors(state.module):
            source = host.get(key)
            if source is None or source.shape != tensor.shape:
                source = self._host(state, key, tensor.data) if keep else tensor.data
            if keep:
                kept[key] = source
            tensor.data = source.to(self.device, non_blocking=self._pin)
        state.host = kept if keep else None
        self._log(Move(name, True, loading.module_bytes(state.module), self._synced(start)))

    def _offload(self, name: str) -> None:
        state = self._components[name]
        start = time.perf_counter()
        keep = self._keeps_host_copy(name)
        host = state.host or {}
        for key, tensor in _tensors(state.module):
            source = host.get(key)
            if source is None or source.shape != tensor.shape:  # no RAM copy yet (e.g. after resident): copy back
                source = self._host(state, key, tensor.data)
                host[key] = source
            tensor.data = source
        state.host = host if keep else None
        state.on_device = False
        self._log(Move(name, False, loading.module_bytes(state.module), self._synced(start)))

    def _stream(self, name: str) -> None:
        """Group offloading for the transformer: installed once and kept while the strategy is group-offload, because
        installing it pins a RAM copy of every block (seconds for FLUX). Under the file-backed RAM strategy the hooks
        keep the blocks' file views instead and pin each block only for its transfer (diffusers' low_cpu_mem_usage)."""
        from diffusers.hooks import apply_group_offloading

        state = self._components[name]
        start = time.perf_counter()
        if not state.streaming:
            if any(t.device.type != "cpu" for _, t in _tensors(state.module)):
                self._offload(name)
            self._back_to_files(state)  # the hooks take the tensors they find as their RAM copies
            apply_group_offloading(
                state.module, onload_device=self.device, offload_device=torch.device("cpu"),
                offload_type="block_level", num_blocks_per_group=1,
                use_stream=self.device.type == "cuda",  # prefetch the next block while this one runs (CUDA only)
                low_cpu_mem_usage=not self._pin,
            )  # fmt: skip
            state.streaming, state.host = True, None  # the hooks keep their own RAM copies
        self._log(Move(name, True, loading.module_bytes(state.module), self._synced(start), "stream"))

    def _unstream(self, name: str) -> None:
        from diffusers.hooks.hooks import HookRegistry

        state = self._components[name]
        registry = HookRegistry.check_if_exists_or_initialize(state.module)
        for hook in _GROUP_OFFLOAD_HOOKS:
            registry.remove_hook(hook, recurse=True)
        state.streaming = False
        if any(t.device.type != "cpu" for _, t in _tensors(state.module)):  # a block left on by a failure
            state.on_device = True
            self._offload(name)

    @staticmethod
    def _back_to_files(state: ComponentState) -> None:
        """Weights in RAM that are copies (pinned) of a file view become the view again, and the copies are freed."""
        for key, tensor in _tensors(state.module):
            source = state.files.get(key)
            if source is not None and tensor.device.type == "cpu" and source.shape == tensor.shape:
                tensor.data = source

    def _drop(self, name: str) -> None:
        """Free a component's weights now (disk strategy); the next get() reads it from its file again."""
        state = self._components.pop(name)
        start, size = time.perf_counter(), loading.module_bytes(state.module)
        # To meta (a device-only move, which quantized modules allow): the storage is freed now, even while a caller
        # still holds the module in a local variable.
        state.module.to("meta")
        state.host = None
        self._log(Move(name, False, size, self._synced(start), "drop"))

    def _synced(self, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest seconds: host-to-device copies are asynchronous
        return time.perf_counter() - start

    def _log(self, move: Move) -> None:
        self._sample_rss()
        self.moves.append(move)
        logger.debug("%s %s: %.1f MiB in %.3f s", move.action, move.component, move.bytes / 2**20, move.seconds)

    def on_device_now(self) -> list[str]:
        return [n for n, s in self._components.items() if s.on_device]

    # -- strategy: plan, switch, fall back ---------------------------------------------------------------------
    def _sizes(self, files: bool = True) -> dict[str, int]:
        """Bytes of each component in memory: measured once loaded, else the preset's figure, else (files=True, and
        only for files on this machine, never a download) the file's size."""
        sizes = {}
        for name in MODEL_COMPONENTS:
            source = self.preset.sources()[name]
            if name in self._sizes_seen:
                sizes[name] = self._sizes_seen[name]
            elif source.approx_bytes or not files or (source.local is None and source.kit is None):
                sizes[name] = source.approx_bytes
            else:
                sizes[name] = self.path(name).stat().st_size
        return sizes

    def _plan(self, arch: planner.Arch, sizes: dict[str, int]) -> planner.Plan:
        width, height = self._image
        # What our components hold counts as available to them, except file views: the kernel already counts page
        # cache as available (pinned copies and dense weights it does not).
        held = {n: s.summary.bytes - (0 if self._pin else _nbytes(s.files)) for n, s in self._components.items()}
        mapped = [n for n in MODEL_COMPONENTS if _is_gguf(self.preset.sources()[n])]
        ram = _ram_available(held)
        return planner.plan(self._free_device_memory(), sizes, width, height, self.dtype, ram_free=ram, arch=arch,
                            strategy=self._requested, ceiling=self._ceiling, mapped=mapped,
                            can_pin=self.device.type == "cuda")  # fmt: skip

    def _replan(self) -> None:
        ram = self.plan.ram
        self.plan = self._plan(planner.Arch.from_config_dir(self.config_dir()), self._sizes())
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
            if ram_changed or not self._keeps_host_copy(name):
                state.host = None  # the device copy or the module's own tensors are the only copy needed
            if ram_changed and not state.on_device:
                self._back_to_files(state)
        self.release()

    def _unstick(self) -> None:
        """After a failure: nothing left on the device that the strategy would not keep there."""
        for name, state in list(self._components.items()):
            if state.streaming and any(t.device.type != "cpu" for _, t in _tensors(state.module)):
                self._unstream(name)  # a failure inside a forward can leave a block on; installed again next stage
        gc.collect()  # the failed stage's activations, held by reference cycles through its frames
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def with_fallback(self, stage: str, run: Callable[[], T], components: Sequence[str]) -> T:
        """Run one stage of a request, which puts `components` on the device. A device out-of-memory frees what the
        stage held, drops to the next lighter strategy and runs the stage again, once; a second one is an
        OutOfMemoryError with the numbers."""
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
        raise OutOfMemoryError(self._oom_message(stage, components, failed, second))

    def _oom_message(self, stage: str, components: Sequence[str], failed: str, detail: str) -> str:
        width, height = self._image
        needed = max(self.plan.stages[part] for part in components)
        free = self._free_device_memory()
        have = f"{free / 2**30:.1f} GiB is free" if free is not None else "its free memory is unknown"
        return (
            f"Out of memory on {self.device} in the {stage} stage at {width}x{height}, with {failed} and again with "
            f"{self.strategy}: it needs about {needed / 2**30:.1f} GiB and {have} ({detail}). Close other programs "
            "using the device, make the image smaller, or use a lighter preset such as dev-q4."
        )

    def _free_device_memory(self) -> int | None:
        """Device memory this process could use: free plus what torch's allocator already holds (ours to reuse).
        None on the CPU, and where the device cannot tell yet (a ZeroGPU Space's main process holds no GPU)."""
        try:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                return free + torch.cuda.memory_reserved(self.device)
            if self.device.type == "mps":
                return (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
                        + torch.mps.current_allocated_memory())  # fmt: skip
        except RuntimeError as e:
            logger.info("free memory of %s unknown (%s); planning without it", self.device, e)
        return None

    def _sample_rss(self) -> None:
        for key, value in _proc_status().items():
            if key in self._rss_peaks:
                self._rss_peaks[key] = max(self._rss_peaks[key], value)

    def memory_report(self) -> dict:
        """The plan, what happened, and peaks: per stage on CUDA (measured), the planned peak and RSS everywhere.

        RSS in two kinds (Linux): anonymous (copies, activations: what RAM must hold) and file-backed (mapped weights:
        page cache the kernel may take back). The kernel keeps a peak of their sum only (peak_rss_bytes); the peaks of
        each kind are sampled at every move and stage end, so a peak inside a stage can be higher."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        report = {
            "strategy": self.strategy,
            "ram": self.plan.ram,
            "plan": self.plan.reason,
            "events": list(self.events),
            "predicted_peak_bytes": self.plan.predicted_peak,
            "predicted_stage_bytes": dict(self.plan.stages),
            "predicted_ram_bytes": self.plan.ram_need,
            "peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024,  # macOS counts bytes, Linux KiB
        }
        self._sample_rss()
        if self._rss_peaks["RssAnon"]:
            report["peak_anon_rss_bytes"] = self._rss_peaks["RssAnon"]
            report["peak_file_rss_bytes"] = self._rss_peaks["RssFile"]
        if self.device.type == "cuda":
            report["stage_peak_bytes"] = dict(self.stage_peaks)
            report["peak_device_bytes"] = max(self.stage_peaks.values(), default=0)
        return report


def _tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _is_gguf(source: Source) -> bool:
    """Whether a component's file is GGUF: the loaders keep its weights as views of the file."""
    return Path(source.local or source.path).suffix == ".gguf"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _proc_status() -> dict[str, int]:
    """This process's memory figures in bytes from /proc/self/status (Linux; empty elsewhere): RssAnon, RssFile,
    VmHWM (peak RSS), ..."""
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines) if v.strip().endswith("kB")}


def _ram_available(held: dict[str, int]) -> int | None:
    """RAM the model may fill: what the kernel calls available plus what our components already hold. Read from
    /proc/meminfo (Linux) because psutil is not a dependency; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return None
    return int(fields["MemAvailable"].split()[0]) * 1024 + sum(held.values())


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
