"""The open model: the manager of its components, with the LoRA library and the adapters on it, and the cache of
prompt embeddings; `open_model()` wires them together (the manager tells the adapters when components come and go).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

from fluxdemo.lora import Adapters, HubLoras, LoraLibrary
from fluxdemo.model import loading
from fluxdemo.model.manager import ModelManager
from fluxdemo.model.presets import Preset

EMBEDDINGS_KEPT = 64  # T5 and CLIP outputs, each under its own key


@dataclass
class Model(ModelManager):
    """A ModelManager with what a run needs beside the components: the LoRA folder (and Hub LoRAs) as a library,
    the adapters that put its LoRAs on the live model, and the prompt-embedding cache."""

    lora_dir: Path = Path("loras")
    hub_loras: HubLoras = HubLoras()  # what LoRAs named by a Hub repo may be fetched, and how

    def __post_init__(self) -> None:
        super().__post_init__()
        self.embedding_cache = LRU(maxsize=EMBEDDINGS_KEPT)
        # LoRAs are judged against this preset's model (a tiny kit's LoRAs fit the tiny model, not FLUX.1-dev).
        dims, clip_config = loading.model_dims(self.config_dir())
        library = LoraLibrary(Path(self.lora_dir), dims, clip_config, **self.hub_loras.library_args())
        self.adapters = Adapters(self, library)
        self.watchers.append(self.adapters)


def open_model(preset: Preset, **options) -> Model:
    """The model of a preset, ready for runs; `options` are Model's fields (device, strategy, lora_dir, ...)."""
    return Model(preset, **options)


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
