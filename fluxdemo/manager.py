"""ModelManager: owns the four components and their tokenizers, decides where each lives, and records every move.

One manager per app. A stage asks `with manager.on_device("transformer") as t:`; the strategy says whether the
component goes back to the CPU afterwards. The order in which stages ask is the offload order, like diffusers'
`model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"`, but ours also works without an
accelerator (diffusers' enable_model_cpu_offload refuses to start on a CPU-only machine) and logs each move.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxdemo import hub, loading
from fluxdemo.config import Preset
from fluxdemo.errors import OptionsError
from fluxdemo.timeline import Timeline

logger = logging.getLogger(__name__)

MODEL_COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae")
LARGE_COMPONENTS = frozenset({"text_encoder_2", "transformer"})
STRATEGIES = ("resident", "model-offload")


@dataclass(frozen=True)
class Move:
    """One component moving on or off the execution device. Logged even when both are the CPU, so the
    strategy's order of moves is the same (and testable) on every machine."""

    component: str
    onload: bool  # True: to the execution device; False: back to offload storage (CPU RAM)
    bytes: int
    seconds: float


@dataclass
class ComponentState:
    module: torch.nn.Module
    summary: loading.LoadSummary
    on_device: bool = False


@dataclass
class ModelManager:
    """The one owner of the model. Use `with manager.session() as timeline:` around a request (the lock)."""

    preset: Preset
    device: torch.device = field(default_factory=lambda: default_device())
    strategy: str = "auto"
    dtype: torch.dtype | None = None  # compute dtype: bf16 on accelerators, fp32 on CPU unless set
    token: str | None = None
    lora_dir: Path = Path("loras")
    moves: list[Move] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.dtype is None:
            self.dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        if self.strategy == "auto":
            self.strategy = "resident" if self.device.type == "cpu" else "model-offload"
        if self.strategy not in STRATEGIES:
            raise OptionsError(f"Unknown memory strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}.")
        self._lock = threading.RLock()
        self._components: dict[str, ComponentState] = {}
        self._paths: dict[str, Path] = {}
        self._tokenizers: tuple | None = None
        self.timeline = Timeline()
        self.embedding_cache = LRU(maxsize=32)
        from fluxdemo.adapters import Adapters
        from fluxdemo.lora import LoraLibrary

        self.adapters = Adapters(self, LoraLibrary(Path(self.lora_dir)))
        logger.info("model manager: preset %s on %s (%s), strategy %s", self.preset.name, self.device,
                    str(self.dtype).removeprefix("torch."), self.strategy)  # fmt: skip

    # -- the lock: one request at a time owns the model -------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[Timeline]:
        """Hold the model for one request; its stages go into a fresh timeline."""
        with self._lock:
            self.timeline = Timeline()
            try:
                yield self.timeline
            finally:
                self.release()

    def release(self) -> None:
        """Put every component where the strategy keeps it between requests (after success, failure or cancel)."""
        for name, state in self._components.items():
            if state.on_device != self._stays(name):
                self._move(name, self._stays(name))

    # -- files and loading -------------------------------------------------------------------------------------
    def path(self, component: str) -> Path:
        if component not in self._paths:
            source = self.preset.sources()[component]
            self._paths[component] = hub.resolve(
                source, token=self.token, component=component, preset=self.preset.name
            )
        return self._paths[component]

    def config_dir(self) -> Path:
        return self.path("config_dir")

    def tokenizers(self):
        if self._tokenizers is None:
            self._tokenizers = loading.load_tokenizers(self.path("tokenizer"), self.path("tokenizer_2"))
        return self._tokenizers

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(loading.read_config(self.config_dir(), "scheduler"))

    def get(self, name: str) -> torch.nn.Module:
        """The component, loaded on first use (once) and placed where the strategy keeps it."""
        if name not in self._components:
            loader = {
                "transformer": loading.load_transformer,
                "text_encoder_2": loading.load_t5,
                "text_encoder": loading.load_clip,
                "vae": loading.load_vae,
            }[name]
            with self.timeline.stage(f"load {name}"):
                module, summary = loader(self.path(name), self.config_dir(), self.dtype)
            self._components[name] = ComponentState(module, summary)
            if self._stays(name):
                self._move(name, True)
        return self._components[name].module

    def loaded(self) -> dict[str, loading.LoadSummary]:
        return {name: state.summary for name, state in self._components.items()}

    # -- placement ---------------------------------------------------------------------------------------------
    def _stays(self, name: str) -> bool:
        """Whether a component waits on the execution device between stages."""
        return self.strategy == "resident"

    def _move(self, name: str, onload: bool) -> None:
        state = self._components[name]
        device = self.device if onload else torch.device("cpu")
        start = time.perf_counter()
        state.module.to(device)  # device only: quantized (GGUF, quanto) modules refuse a dtype cast
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state.on_device = onload
        move = Move(name, onload, loading.module_bytes(state.module), time.perf_counter() - start)
        self.moves.append(move)
        logger.debug("move %s -> %s: %.1f MiB in %.3f s", name, device, move.bytes / 2**20, move.seconds)

    @contextmanager
    def on_device(self, name: str) -> Iterator[torch.nn.Module]:
        """The component on the execution device for one stage; afterwards wherever the strategy keeps it."""
        module = self.get(name)
        if name in LARGE_COMPONENTS and self.strategy == "model-offload":
            for other in sorted(LARGE_COMPONENTS - {name}):  # at most one large component on the device at a time
                if other in self._components and self._components[other].on_device:
                    self._move(other, False)
        if not self._components[name].on_device:
            self._move(name, True)
        try:
            yield module
        finally:
            if self._components[name].on_device != self._stays(name):
                self._move(name, self._stays(name))

    def on_device_now(self) -> list[str]:
        return [n for n, s in self._components.items() if s.on_device]

    def memory_report(self) -> dict:
        """Peak memory of the process so far: the device's peak allocation where known, and the CPU's RSS."""
        report = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.device.type == "cuda":
            report["peak_device_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return report


class LRU:
    """A small least-recently-used map (prompt embeddings)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: Hashable, value: object) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
