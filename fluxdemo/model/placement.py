"""Where one component's weights live: the RAM and device copies the manager's strategies move between.

These functions move tensors and nothing else; the manager decides when, and times and logs each move.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fluxdemo.model import loading

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
    # Weights that are views of their file's memory map (GGUF), by name: a RAM copy that costs no anonymous memory.
    files: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return loading.module_bytes(self.module)

    def off_cpu(self) -> bool:
        """Whether any weight is on the device (a block left there by a failure, say)."""
        return any(t.device.type != "cpu" for _, t in tensors(self.module))


def tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def host_copy(state: ComponentState, key: str, tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """A RAM tensor for a weight: its view of the file where it has one, else itself when in RAM, else a copy;
    pinned (a copy) under the pinned RAM strategy."""
    source = state.files.get(key)
    if source is None or source.shape != tensor.shape:
        source = tensor if tensor.device.type == "cpu" else tensor.to("cpu")
    return source.pin_memory() if pin and not source.is_pinned() else source


def onload(state: ComponentState, device: torch.device, *, keep: bool, pin: bool) -> None:
    """To the device; `keep`: the RAM copy stays, so that the trip back copies nothing."""
    state.on_device = True  # first: if a copy fails half-way (out of memory), release() still takes it off
    host = state.host or {}
    kept: dict[str, torch.Tensor] = {}
    # Swap .data as module.to() does, but from the RAM copy: quantized (GGUF, quanto) modules refuse a dtype cast.
    for key, tensor in tensors(state.module):
        source = host.get(key)
        if source is None or source.shape != tensor.shape:
            source = host_copy(state, key, tensor.data, pin) if keep else tensor.data
        if keep:
            kept[key] = source
        tensor.data = source.to(device, non_blocking=pin)
    state.host = kept if keep else None


def offload(state: ComponentState, *, keep: bool, pin: bool) -> None:
    host = state.host or {}
    for key, tensor in tensors(state.module):
        source = host.get(key)
        if source is None or source.shape != tensor.shape:  # no RAM copy yet (e.g. after resident): copy back
            source = host_copy(state, key, tensor.data, pin)
            host[key] = source
        tensor.data = source
    state.host = host if keep else None
    state.on_device = False


def stream(state: ComponentState, device: torch.device, *, pin: bool) -> None:
    """Install group offloading on a component in RAM: it streams block by block during its stage. Under the
    file-backed RAM strategy the hooks keep the blocks' file views and pin each only for its transfer."""
    from diffusers.hooks import apply_group_offloading

    back_to_files(state)  # the hooks take the tensors they find as their RAM copies
    apply_group_offloading(
        state.module,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=device.type == "cuda",  # prefetch the next block while this one runs (CUDA only)
        low_cpu_mem_usage=not pin,
    )
    state.streaming, state.host = True, None  # the hooks keep their own RAM copies


def unstream(state: ComponentState) -> None:
    from diffusers.hooks.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(state.module)
    for hook in _GROUP_OFFLOAD_HOOKS:
        registry.remove_hook(hook, recurse=True)
    state.streaming = False


def back_to_files(state: ComponentState) -> None:
    """Weights in RAM that are copies (pinned) of a file view become the view again, and the copies are freed."""
    for key, tensor in tensors(state.module):
        source = state.files.get(key)
        if source is not None and tensor.device.type == "cpu" and source.shape == tensor.shape:
            tensor.data = source


def drop(state: ComponentState) -> None:
    """Free a component's weights now, even while a caller still holds the module: to meta, a device-only move that
    quantized modules allow."""
    state.module.to("meta")
    state.host = None
