"""The open model: the manager of its components, with the LoRA library and the adapters on it, and the cache of
prompt embeddings; `open_model()` wires them together (the manager tells the adapters when components come and go).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fluxdemo.errors import OptionsError
from fluxdemo.lora import Adapters, HubLoras, LoraLibrary
from fluxdemo.lora.compile_options import CompileSettings
from fluxdemo.lora.hotswap import dense_weights
from fluxdemo.lru import LRU
from fluxdemo.model import loading
from fluxdemo.model.manager import ModelManager
from fluxdemo.model.presets import Preset

EMBEDDINGS_KEPT = 64  # T5 and CLIP outputs, each under its own key


class Runner(Protocol):
    """Where a run's images are made when not in this process (fluxdemo.serve: Ray Serve replicas); `jobs` is how
    many runs may go at once. Its `run` has experiments.run's arguments and result."""

    jobs: int

    def run(self, manager: Model, specs: Sequence, controls, cache, batch: int): ...


@dataclass
class Model(ModelManager):
    """A ModelManager with what a run needs beside the components: the LoRA folder (and Hub LoRAs) as a library,
    the adapters that put its LoRAs on the live model, and the prompt-embedding cache."""

    lora_dir: Path = Path("loras")
    hub_loras: HubLoras = HubLoras()  # what LoRAs named by a Hub repo may be fetched, and how
    runner: Runner | None = None  # None: runs are made here; else where (the model then never loads here)
    compile: CompileSettings | None = None  # --compile: regional compilation, LoRAs hot-swapped (lora.hotswap)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compile is not None:
            self.weights_choice = dense_weights(self.weights_choice, self.weights, self.device.type)
        if self.compile is not None and self.compile.ahead_of_time and self.weights_choice.format == "fp8":
            # the programs take each block's state_dict, where torchao's fp8 weights are tensor subclasses
            raise OptionsError(
                "--compile aot does not take fp8 weights yet: start with --weights bf16, or with --compile on."
            )
        self.embedding_cache = LRU(maxsize=EMBEDDINGS_KEPT)
        # LoRAs are judged against this preset's model (a tiny kit's LoRAs fit the tiny model, not FLUX.1-dev).
        dims, clip_config = loading.model_dims(self.config_dir())
        library = LoraLibrary(Path(self.lora_dir), dims, clip_config, **self.hub_loras.library_args())
        self.adapters = Adapters(self, library, compile=self.compile)
        self.watchers.append(self.adapters)


def open_model(preset: Preset, **options) -> Model:
    """The model of a preset, ready for runs; `options` are Model's fields (device, strategy, lora_dir, ...)."""
    return Model(preset, **options)
