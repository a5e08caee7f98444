"""LoRA adapters on the live model: load (once, cached), switch, set strength, turn off, evict.

Files are read and converted by fluxdemo.lora (our own converter: diffusers' kohya and single-file converters
hard-code width 3072 and load some wrong-model files as silent no-ops). The converted PEFT weights go onto the
quantized transformer with diffusers' load_lora_adapter (pipe.load_lora_weights breaks on quanto's state dict);
strength is PEFT's adapter weight, so nothing is ever fused into the quantized weights and "off" is bit-identical.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fluxdemo.errors import LoraError
from fluxdemo.flux_names import FluxDims

if TYPE_CHECKING:
    from fluxdemo.lora import LoraLibrary, LoraReport
    from fluxdemo.manager import ModelManager

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedLora:
    name: str  # the library name (path relative to the LoRA folder)
    adapter: str  # PEFT adapter name
    sha256: str
    report: LoraReport
    affects_text_encoder: bool
    seconds: float  # what loading it cost

    def summary(self, strength: float) -> dict:
        r = self.report
        return {
            "name": self.name, "sha256": self.sha256, "format": r.format, "rank": r.rank, "alpha": r.alpha,
            "strength": strength, "targets": r.targets, "modules": r.modules, "text_encoder": r.text_encoder,
            "trigger_words": r.trigger_words,
        }  # fmt: skip


class Adapters:
    """The LoRAs loaded onto the manager's transformer (and CLIP), at most max_loaded, least recently used out."""

    def __init__(self, manager: ModelManager, library: LoraLibrary, max_loaded: int = 4) -> None:
        self.manager = manager
        self.library = library
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, LoadedLora] = OrderedDict()  # by sha256: renamed copies share one adapter
        self._active: tuple[LoadedLora, float] | None = None

    # PEFT flips requires_grad on every adapter it holds; adapters made under inference mode (as runs make them)
    # can only be touched under it, so every method that calls PEFT runs there, whoever calls it.
    @torch.inference_mode()
    def load(self, name: str) -> LoadedLora:
        """The named LoRA from the library, loaded as an adapter (a cache hit costs only the file's stat)."""
        entry = self.library.get(name)
        if entry.sha256 in self._loaded:
            self._loaded.move_to_end(entry.sha256)
            return self._loaded[entry.sha256]
        from fluxdemo.lora import to_diffusers

        with self.manager.timeline.stage("load LoRA", entry.name):
            start = time.perf_counter()
            transformer = self.manager.get("transformer")
            clip = self.manager.get("text_encoder")
            converted = to_diffusers(
                entry.path, FluxDims.from_config(dict(transformer.config)), dict(clip.config.to_dict())
            )
            adapter = f"lora_{entry.sha256[:16]}"
            try:
                self._attach(adapter, converted)
            except Exception:
                self._detach(adapter)  # never leave a half-loaded adapter behind
                raise
            loaded = LoadedLora(entry.name, adapter, entry.sha256, converted.report, bool(converted.text_encoder),
                                time.perf_counter() - start)  # fmt: skip
        self._loaded[entry.sha256] = loaded
        while len(self._loaded) > self.max_loaded:
            _, old = self._loaded.popitem(last=False)
            self._detach(old.adapter)
        self.activate(*self._active) if self._active else self.activate(None, 0.0)
        return loaded

    def _attach(self, adapter: str, converted) -> None:
        from diffusers import FluxPipeline

        transformer = self.manager.get("transformer")
        transformer.load_lora_adapter(converted.transformer, prefix="transformer", adapter_name=adapter)
        if converted.text_encoder:
            FluxPipeline.load_lora_into_text_encoder(
                converted.text_encoder, network_alphas=None, text_encoder=self.manager.get("text_encoder"),
                prefix="text_encoder", adapter_name=adapter,
            )  # fmt: skip
        self._verify(adapter, converted)

    def _verify(self, adapter: str, converted) -> None:
        # diffusers warns and carries on when keys do not match; a LoRA that loads partly is a silent failure.
        for component, weights in (("transformer", converted.transformer), ("text_encoder", converted.text_encoder)):
            module = self.manager.get(component)
            targets = {k.removeprefix(f"{component}.").rsplit(".lora_", 1)[0] for k in weights}
            # transformers 5's CLIPTextModel has no text_model wrapper; the LoRA keys (diffusers' naming) still do
            prefix = "" if hasattr(module, "text_model") else "text_model."
            layers = {t: module.get_submodule(t.removeprefix(prefix)) for t in targets}
            absent = [t for t, layer in layers.items() if adapter not in getattr(layer, "lora_A", {})]
            if absent:
                raise LoraError(
                    f"The LoRA did not attach to {len(absent)} of {len(targets)} {component} modules "
                    f"(e.g. {absent[:3]}); nothing was changed. Check it with `python -m fluxdemo inspect-lora`."
                )

    @torch.inference_mode()
    def _detach(self, adapter: str) -> None:
        from fluxdemo.pipeline import pipeline_view

        for component in ("transformer", "text_encoder"):
            module = self.manager.get(component)
            if adapter in (getattr(module, "peft_config", None) or {}):
                pipeline_view(self.manager, **{component: module}).delete_adapters(adapter)

    @torch.inference_mode()
    def activate(self, loaded: LoadedLora | None, strength: float) -> None:
        """Make one LoRA active at a strength, or (None) run the base model exactly."""
        if not self._loaded:
            return
        from fluxdemo.pipeline import pipeline_view

        view = pipeline_view(self.manager, transformer=self.manager.get("transformer"),
                     text_encoder=self.manager.get("text_encoder"))  # fmt: skip
        if loaded is None:
            view.disable_lora()
            self._active = None
            return
        view.enable_lora()
        view.set_adapters([loaded.adapter], adapter_weights=[strength])
        self._active = (loaded, strength)

    @torch.inference_mode()
    def reattach(self) -> None:
        """Attach every loaded LoRA again to a transformer read back from its file (the disk strategy drops it after
        its stage; the text encoder keeps its adapters). A file gone or changed since is let go. None is active after.
        """
        from fluxdemo.lora import to_diffusers

        transformer = self.manager.get("transformer")
        dims, clip = FluxDims.from_config(dict(transformer.config)), self.manager.get("text_encoder")
        with self.manager.timeline.stage("reattach LoRAs", f"{len(self._loaded)} adapters"):
            for sha256, loaded in list(self._loaded.items()):
                try:
                    converted = to_diffusers(self.library.get(loaded.name).path, dims, dict(clip.config.to_dict()))
                except LoraError:
                    converted = None
                if converted is None or converted.report.sha256 != sha256:
                    logger.warning("LoRA %s changed on disk since it was loaded; it is unloaded.", loaded.name)
                    del self._loaded[sha256]
                    self._detach(loaded.adapter)
                    continue
                transformer.load_lora_adapter(converted.transformer, prefix="transformer", adapter_name=loaded.adapter)
        self._active = None
        self.activate(None, 0.0)

    def text_encoder_state(self) -> tuple[str, float] | None:
        """What the text encoder's output depends on besides the prompt (a key for the embedding cache)."""
        if self._active and self._active[0].affects_text_encoder:
            return self._active[0].adapter, self._active[1]
        return None

    def loaded(self) -> list[LoadedLora]:
        return list(self._loaded.values())
