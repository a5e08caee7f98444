"""--compile: the transformer's repeated blocks compiled once, LoRAs hot-swapped into fixed adapter slots, so that
changing the LoRA, the stack or a strength never recompiles.

Dynamo guards on Python values: PEFT's float scalings, adapters added or turned off, and the adapter_names of mixed
batches each make a new graph. So the transformer gets `slots` PEFT adapters once, before compiling (zero LoRAs of
rank `rank` over every linear layer, lora_bias included, so any LoRA targets a subset), all of them always active.
Their scalings are tensors (PEFT's prepare_model_for_compiled_hotswap) set in place: a slot's strength is one number
because our converter folds each module's alpha / rank into lora_B. A LoRA goes into a slot with PEFT's
hotswap_adapter_from_state_dict (it zeroes the modules the LoRA lacks and pads smaller ranks); its converted weights
stay in RAM while the adapters' LRU keeps it, so switching back is a copy, not a file read. The base model is every
slot at strength 0: the same graph, and x + 0 * delta is x exactly. (A new image size still compiles once more;
dynamo then makes the sizes dynamic.)

Ahead of time (--compile aot, fluxdemo.lora.aot) the scalings stay PEFT's floats, all 1: an exported program keeps a
scaling tensor as a constant of its own, out of the module's reach. A strength is folded into the slot's lora_B
instead (a copy from the kept weights, scaled), and a slot at strength 0 is emptied: lora_B zero, the base exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils.hotswap import hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap

from fluxdemo.errors import LoraError, OptionsError
from fluxdemo.lora.aot import AheadOfTime
from fluxdemo.lora.compile_options import CompileSettings, check_stack
from fluxdemo.model.weights import WeightsChoice

logger = logging.getLogger(__name__)


def dense_weights(choice: WeightsChoice, requested: str, device_type: str) -> WeightsChoice:
    """The weight format under --compile: GGUF's packed weights are a tensor subclass that dynamo cannot trace whole
    (fullgraph), so the transformer is dense; on the CPU, dense draws GGUF's pictures bit for bit."""
    if choice.format != "gguf":
        return choice
    if requested == "auto" and device_type == "cpu":
        return WeightsChoice(
            "bf16", "Dense weights (the compute dtype): --compile needs them; they draw GGUF's pictures."
        )
    why = "--weights gguf was asked" if requested == "gguf" else "only GGUF fits this device's free memory"
    raise OptionsError(f"--compile needs dense weights (bf16 or fp8), but {why}: start without --compile.")


class Slots:
    """The compiled transformer's adapter slots: which LoRA each holds, and the strength each runs at."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        settings: CompileSettings,
        device: torch.device,
        states: Mapping[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Slots on a freshly loaded transformer that runs on `device`, then compiled; `states`: the LoRAs kept for an
        earlier copy of it."""
        self.settings = settings
        self.names = [f"slot{i}" for i in range(settings.slots)]
        self._transformer = transformer
        self._held: list[str | None] = [None] * settings.slots  # the adapter (lora_<sha>) in each slot
        self.states = dict(states or {})  # converted weights by adapter, PEFT keys without the adapter name
        targets = sorted(n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear))
        config = LoraConfig(r=settings.rank, lora_alpha=settings.rank, target_modules=targets, lora_bias=True)
        for name in self.names:
            transformer.add_adapter(config, adapter_name=name)
        transformer.set_adapters(self.names, [1.0] * settings.slots)  # all active for good: alpha / r = 1
        self._folded = settings.ahead_of_time
        if not self._folded:
            prepare_model_for_compiled_hotswap(transformer)  # PEFT's float scalings -> tensors, set in place
        self._layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
        self._config = config
        for layer in self._layers:
            for name in self.names:
                if not self._folded:  # where the blocks run: the manager moves parameters and buffers only
                    layer.scaling[name] = layer.scaling[name].to(device)
        self._strengths: list[float | None] = [None] * settings.slots
        for slot in range(settings.slots):
            self._empty(slot)  # a zero LoRA, whatever PEFT's init drew
        self._set(0.0 for _ in self.names)
        self.ahead = AheadOfTime(transformer) if self._folded else None
        if self.ahead is None:
            transformer.compile_repeated_blocks(fullgraph=True, backend=settings.backend)
        logger.info(settings.describe())

    def keep(self, adapter: str, name: str, weights: Mapping[str, torch.Tensor]) -> None:
        """Hold a LoRA's converted transformer weights (keys `transformer.<module>.lora_A.weight`) for its turns in a
        slot, after checking that they fit one."""
        states = {k.removeprefix("transformer."): v for k, v in weights.items()}
        ranks = {v.shape[0] for k, v in states.items() if k.endswith("lora_A.weight")}
        if not states:
            return
        if max(ranks) > self.settings.rank:
            raise LoraError(
                f"{name} has rank {max(ranks)}, more than the compiled slots' rank {self.settings.rank}: restart with "
                f"--compile-rank {max(ranks)} (or more), or without --compile."
            )
        self.states[adapter] = states

    def holds(self, adapter: str) -> bool:
        """Whether a LoRA has a transformer part kept for the slots (a CLIP-only LoRA has none)."""
        return adapter in self.states

    def forget(self, adapter: str) -> None:
        self.states.pop(adapter, None)  # a slot holding it keeps its copy until another LoRA needs the slot

    def activate(self, stack: Sequence[tuple[str, float]]) -> None:
        """Run the (adapter, strength) pairs of a stack, every other slot at 0: LoRAs not in a slot are swapped in
        (into a slot no LoRA of the stack holds)."""
        check_stack(self.settings, len(stack))
        wanted = dict(stack)
        free = [i for i, held in enumerate(self._held) if held not in wanted]
        free.sort(key=lambda i: self._held[i] is not None)  # empty slots first: a LoRA stays in its slot longest
        strengths = [0.0] * len(self.names)
        for adapter, strength in stack:
            if adapter not in self._held:
                slot = free.pop(0)
                self._swap(slot, adapter, float(strength) if self._folded else 1.0)
            strengths[self._held.index(adapter)] = float(strength)
        self._set(strengths)

    def lose_track(self) -> None:
        """The slots' tensors were replaced behind their back (model-offload puts the RAM copy back at the end of a
        request): nothing is known held or set, so the next activate swaps its LoRAs in and sets every slot."""
        self._held = [None] * len(self.names)
        self._strengths = [None] * len(self.names)

    def _swap(self, slot: int, adapter: str, strength: float) -> None:
        name, fold = self.names[slot], self._folded and strength != 1.0
        states = {
            k.replace(".lora_A.", f".lora_A.{name}.").replace(".lora_B.", f".lora_B.{name}."): (
                v * strength if fold and ".lora_B." in k else v
            )
            for k, v in self.states[adapter].items()
        }
        self._held[slot], self._strengths[slot] = None, None  # half-swapped until the copy is done
        hotswap_adapter_from_state_dict(self._transformer, states, name, self._config)
        self._held[slot] = adapter  # its scalings are 1 now (set again by the caller's _set unless folded)
        if self._folded:
            self._strengths[slot] = strength

    def _empty(self, slot: int) -> None:
        """A slot with nothing in it: lora_B zero, so the slot adds exactly 0 at any strength."""
        for layer in self._layers:
            layer.lora_B[self.names[slot]].weight.data.zero_()
            layer.lora_B[self.names[slot]].bias.data.zero_()
        self._held[slot] = None

    def _set(self, strengths: Iterable[float]) -> None:
        for slot, strength in enumerate(strengths):
            if self._strengths[slot] == strength:
                continue
            if self._folded and strength == 0.0:
                self._empty(slot)  # cheaper than a copy scaled by 0, and the LoRA's kept weights may be gone
            elif self._folded and self._held[slot] is not None:
                self._swap(slot, self._held[slot], strength)
            elif not self._folded:
                for layer in self._layers:
                    layer.scaling[self.names[slot]].fill_(strength)
            self._strengths[slot] = strength
