"""LoRA adapters on the live model: load (once, cached), activate a stack of them with a strength each, turn off,
evict.

Files are read and converted by fluxdemo.lora.convert (our own converter: diffusers' kohya and single-file converters
hard-code width 3072 and load some wrong-model files as silent no-ops). The converted PEFT weights go onto the
quantized transformer with diffusers' load_lora_adapter (pipe.load_lora_weights breaks on quanto's state dict);
strength is PEFT's adapter weight, so nothing is ever fused into the quantized weights and "off" is bit-identical.
A stack is several adapters active at once, each with its own weight (PEFT sums their deltas). Under --compile the
transformer's part goes into compiled slots instead (fluxdemo.lora.hotswap); CLIP keeps this path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.loaders.lora_base import set_adapters_for_text_encoder
from diffusers.utils.peft_utils import delete_adapter_layers, set_adapter_layers
from peft.tuners.lora import LoraLayer

from fluxdemo.errors import LoraError
from fluxdemo.lora import lycoris
from fluxdemo.lora.aot import AheadOfTime
from fluxdemo.lora.compile_options import CompileSettings, check_stack, check_strategy
from fluxdemo.lora.convert import to_diffusers
from fluxdemo.lora.hotswap import Slots
from fluxdemo.lora.library import LoraLibrary
from fluxdemo.lora.report import LoraReport
from fluxdemo.lru import LRU
from fluxdemo.model.manager import ModelManager
from fluxdemo.model.names import FluxDims

# (adapter, strength) pairs, active together; empty: the base model.
Stack = Sequence[tuple["LoadedLora", float]]
COMPONENTS = ("transformer", "text_encoder")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedLora:
    name: str  # the library name (path relative to the LoRA folder)
    adapter: str  # PEFT adapter name
    sha256: str
    report: LoraReport
    affects_text_encoder: bool
    seconds: float  # what loading it cost
    per_sample: bool  # its transformer part is PEFT LoRA layers only (no factored LoKr/LoHa): it can run per sample


class Adapters:
    """The LoRAs loaded onto the manager's transformer (and CLIP), at most max_loaded, least recently used out."""

    def __init__(
        self, manager: ModelManager, library: LoraLibrary, max_loaded: int = 4, compile: CompileSettings | None = None
    ) -> None:
        self.manager = manager
        self.library = library
        self.compile = compile  # None: eager, each LoRA its own PEFT adapter on the transformer
        self._slots: Slots | None = None  # under --compile, once the transformer is loaded
        self._loaded = LRU(max_loaded)  # LoadedLora by sha256: renamed copies share one adapter
        self._active: dict[str, tuple[tuple[LoadedLora, float], ...]] = dict.fromkeys(COMPONENTS, ())

    @property
    def max_loaded(self) -> int:
        return self._loaded.maxsize

    @max_loaded.setter
    def max_loaded(self, count: int) -> None:  # takes effect at the next load
        self._loaded.maxsize = count

    @property
    def ahead_of_time(self) -> AheadOfTime | None:
        """Under --compile aot, the transformer's compiled block programs (None before it loads, or otherwise)."""
        return self._slots.ahead if self._slots is not None else None

    def check_stack(self, count: int) -> None:
        """A stack of `count` LoRAs fits here (under --compile, the compiled slots), else a sentence."""
        check_stack(self.compile, count)

    # PEFT flips requires_grad on every adapter it holds; adapters made under inference mode (as runs make them)
    # can only be touched under it, so every method that calls PEFT runs there, whoever calls it.
    @torch.inference_mode()
    def load(self, name: str, keep: Iterable[str] = ()) -> LoadedLora:
        """The named LoRA from the library, loaded as an adapter (a cache hit costs only the file's stat). Eviction
        spares the adapters named in `keep` (the rest of a stack being loaded)."""
        entry = self.library.get(name)
        if entry.sha256 in self._loaded:
            return self._loaded.get(entry.sha256)
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
            loaded = LoadedLora(
                entry.name,
                adapter,
                entry.sha256,
                converted.report,
                bool(converted.text_encoder),
                time.perf_counter() - start,
                not converted.factored.get("transformer") and self.compile is None,  # compiled: one graph for all
            )
        spare = {loaded.sha256, *(lora.sha256 for _, lora in self._loaded.items() if lora.name in set(keep))}
        for old in self._loaded.put(loaded.sha256, loaded, spare):
            self._detach(old.adapter)
        for component, stack in self._active.items():  # loading made the new adapter active; put back what was
            self.activate([(lora, s) for lora, s in stack if lora.sha256 in self._loaded], (component,))
        return loaded

    def load_stack(self, names: Sequence[str]) -> list[LoadedLora]:
        """Every LoRA of a stack loaded at once (none evicted for another of the same stack)."""
        return [self.load(name, keep=names) for name in names]

    def _attach(self, adapter: str, converted) -> None:
        from diffusers import FluxPipeline

        transformer = self.manager.get("transformer")
        if self.compile is None:
            transformer.load_lora_adapter(converted.transformer, prefix="transformer", adapter_name=adapter)
        elif converted.factored.get("transformer"):
            raise LoraError(
                f"{converted.report.name} is a LoKr/LoHa, which cannot be hot-swapped into the compiled transformer: "
                "start without --compile to use it."
            )
        elif converted.transformer:
            self._slots.keep(adapter, converted.report.name, converted.transformer)
        if converted.text_encoder:
            FluxPipeline.load_lora_into_text_encoder(
                converted.text_encoder,
                network_alphas=None,
                text_encoder=self.manager.get("text_encoder"),
                prefix="text_encoder",
                adapter_name=adapter,
            )
        for component, parts in converted.factored.items():  # LoKr/LoHa, kept factored beside the LoRA layers
            lycoris.attach(self.manager.get(component), parts, adapter)
        self._verify(adapter, converted)

    def _verify(self, adapter: str, converted) -> None:
        # diffusers warns and carries on when keys do not match; a LoRA that loads partly is a silent failure.
        for component, parts in converted.factored.items():
            if absent := lycoris.attached(self.manager.get(component), parts, adapter):
                raise LoraError(
                    f"The LoKr/LoHa part of the LoRA did not attach to {len(absent)} {component} modules (e.g. "
                    f"{absent[:3]}); nothing was changed. Check it with `python -m fluxdemo inspect-lora`."
                )
        pairs = {"transformer": converted.transformer, "text_encoder": converted.text_encoder}
        for component, weights in pairs.items():
            if component == "transformer" and self.compile is not None:
                continue  # kept for the slots; hotswap checks every key when it swaps them in
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
        transformer, clip = self.manager.get("transformer"), self.manager.get("text_encoder")
        if self._slots is not None:
            self._slots.forget(adapter)
        elif adapter in (getattr(transformer, "peft_config", None) or {}):
            transformer.delete_adapters(adapter)
        if adapter in (getattr(clip, "peft_config", None) or {}):
            delete_adapter_layers(clip, adapter)

    @torch.inference_mode()
    def activate(self, stack: Stack, components: Sequence[str] = COMPONENTS) -> None:
        """Make a stack of LoRAs active, each at its strength, on the given components; an empty stack runs the
        base model exactly. A component holding none of the stack's adapters runs as the base model."""
        for component in components:
            if component == "transformer" and self.compile is not None:
                self._activate_slots(stack)
                continue
            module = self.manager.get(component)
            held = getattr(module, "peft_config", None) or {}
            mine = [(lora, strength) for lora, strength in stack if lora.adapter in held]
            if held and not mine:
                set_adapter_layers(module, enabled=False)  # PEFT's "off": the base layers alone, bit for bit
            elif mine:
                set_adapter_layers(module, enabled=True)
                names, weights = [lora.adapter for lora, _ in mine], [float(s) for _, s in mine]
                if component == "transformer":
                    module.set_adapters(names, weights)
                else:
                    set_adapters_for_text_encoder(names, module, weights)
            self._active[component] = tuple(mine)

    def _activate_slots(self, stack: Stack) -> None:
        self.manager.get("transformer")  # the slots come with it
        if stack:  # the base model needs no check: releasing the model after a fallback to disk sets it
            check_strategy(self.compile, self.manager.strategy)
        mine = [(lora, strength) for lora, strength in stack if self._slots.holds(lora.adapter)]
        self._slots.activate([(lora.adapter, strength) for lora, strength in mine])
        self._active["transformer"] = tuple(mine)

    @contextmanager
    def per_sample(self, stacks: Sequence[Stack]) -> Iterator[None]:
        """Inside, sample i of every transformer pass runs with stacks[i]: the base model or one LoRA at its strength
        (PEFT's mixed-batch inference: `adapter_names` handed to each LoRA layer; diffusers' transformer does not
        pass it down, hence the hooks). Each LoRA must be per_sample, at one strength across the stacks."""
        strengths = {lora.adapter: s for stack in stacks for lora, s in stack}
        if any(
            len(stack) > 1 or not lora.per_sample or strengths[lora.adapter] != s
            for stack in stacks
            for lora, s in stack
        ):
            raise ValueError(f"Not one plain LoRA per sample at one strength each: {stacks}")
        self.activate(
            list({lora.adapter: (lora, s) for stack in stacks for lora, s in stack}.values()), ("transformer",)
        )
        names = [stack[0][0].adapter if stack else "__base__" for stack in stacks]

        def hand_down(module, args, kwargs):
            return args, {**kwargs, "adapter_names": names}

        layers = [m for m in self.manager.get("transformer").modules() if isinstance(m, LoraLayer)]
        handles = [layer.register_forward_pre_hook(hand_down, with_kwargs=True) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def deactivate(self, components: Sequence[str] = COMPONENTS) -> None:
        """The base model on the given components (all by default)."""
        if self._loaded:
            self.activate((), components)

    def active(self, component: str = "transformer") -> tuple[tuple[LoadedLora, float], ...]:
        """The (LoRA, strength) pairs active on a component now."""
        return self._active[component]

    @torch.inference_mode()
    def reattach(self) -> None:
        """Attach every loaded LoRA again to a transformer read back from its file (the disk strategy drops it after
        its stage; the text encoder keeps its adapters). A file gone or changed since is let go. None is active after.
        """
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
                    self._loaded.pop(sha256)
                    self._detach(loaded.adapter)
                    continue
                transformer.load_lora_adapter(converted.transformer, prefix="transformer", adapter_name=loaded.adapter)
                lycoris.attach(transformer, converted.factored.get("transformer", []), loaded.adapter)
        self._active["transformer"] = ()
        self.activate((), ("transformer",))

    def loaded(self) -> list[LoadedLora]:
        return [lora for _, lora in self._loaded.items()]

    # -- what the manager tells its watchers (model.manager.ComponentWatcher) ---------------------------------------
    def component_loaded(self, name: str) -> None:
        if name == "transformer" and self.compile is not None:  # the slots, then the compile, on this module
            check_strategy(self.compile, self.manager.strategy)
            kept = self._slots.states if self._slots is not None else {}
            self._slots = Slots(self.manager.get("transformer"), self.compile, self.manager.device, kept)
        elif name == "transformer" and self._loaded:  # read back from its file: the LoRAs it had are gone
            self.reattach()

    def component_dropping(self, name: str) -> None:
        if name == "transformer" and self.compile is None:  # compiled: the slots go with the module
            self.activate((), ("transformer",))  # so no LoRA state outlives the module it lived on

    def components_released(self, loaded: Sequence[str]) -> None:
        # a dropped transformer took its adapter state with it; CLIP keeps its adapters under every strategy
        self.deactivate([c for c in ("transformer", "text_encoder") if c in loaded])
        if self._slots is not None and "transformer" in loaded and self.manager.strategy != "resident":
            self._slots.lose_track()  # swapped in on the device, lost when the RAM copy goes back
