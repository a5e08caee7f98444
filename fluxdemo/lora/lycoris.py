"""LyCORIS LoKr and LoHa applied in factored form: memory is the file's own tensors, whatever the factor.

A LoKr delta is kron(W1, W2) and a LoHa delta (a1 @ b1) * (a2 @ b2); as a LoRA pair their exact rank can reach the
layer's full width (SimpleTuner's documented FLUX LoKr, full w1/w2 at factor 16, would need about 34 GB at real size),
and PEFT's own LoKr/LoHa layers (peft.tuners.lokr/loha) build the dense delta in every forward. Here the layer's input
is multiplied through the factors instead:
- LoKr: kron(W1, W2) @ x = vec(W1 @ X @ W2^T) with X = x viewed as (in1, in2), so a forward costs two small matmuls;
  a factor stored as a low-rank pair (w2_a @ w2_b) is applied as such.
- LoHa: (a1 @ b1) * (a2 @ b2) = (a1 (x)row a2) @ (b1 (x)col b2) (face-splitting products), formed per forward from
  the rank-r factors (r*r columns, a few MB), never kept.

FactoredDeltaLayer is a PEFT tuner layer, so diffusers' set_adapters (strength), enable/disable_lora and
delete_adapters drive it exactly like the LoRA layers it sits beside; the base weights are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


@dataclass(frozen=True)
class FactoredPart:
    """One diffusers module's share of a file's LoKr/LoHa module: factors as stored, scale, and output rows."""

    module: str  # diffusers module name within its component
    kind: str  # "lokr" | "loha"
    tensors: dict[str, torch.Tensor]  # role (lokr_w1, hada_w1_a, ...) -> tensor as stored (fp8 upcast)
    scale: float  # alpha / rank as LyCORIS applies it (1 without alpha or with both LoKr factors full)
    rows: tuple[tuple[int, int], ...]  # this module's rows of the file module's delta, as [start, end) ranges
    in_features: int

    @property
    def out_features(self) -> int:
        return sum(end - start for start, end in self.rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class _Factors(nn.Module):
    """The factors of one adapter on one layer (buffers: they follow the layer's device moves)."""

    def __init__(self, part: FactoredPart) -> None:
        super().__init__()
        self.kind, self.scale, self.rows = part.kind, part.scale, part.rows
        for role, t in part.tensors.items():
            self.register_buffer(role, t, persistent=False)

    def _get(self, role: str, dtype: torch.dtype) -> torch.Tensor | None:
        t = getattr(self, role, None)
        return None if t is None else t.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """scale * x @ delta[rows].T, for x of shape (..., in)."""
        flat = x.reshape(-1, x.shape[-1])
        parts = [self._lokr(flat, s, e) for s, e in self.rows] if self.kind == "lokr" else self._loha(flat)
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return (y * self.scale).reshape(*x.shape[:-1], y.shape[-1])

    def _lokr(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        d = x.dtype
        w1 = self._get("lokr_w1", d)
        w1 = w1 if w1 is not None else self._get("lokr_w1_a", d) @ self._get("lokr_w1_b", d)
        inner = x.reshape(x.shape[0], w1.shape[1], -1)  # (N, in1, in2)
        w2 = self._get("lokr_w2", d)  # else the low-rank pair w2_a @ w2_b, applied as two matmuls
        t = inner @ w2.T if w2 is not None else (inner @ self._get("lokr_w2_b", d).T) @ self._get("lokr_w2_a", d).T
        out2 = t.shape[-1]
        first, last = start // out2, -(-end // out2)  # the W1 rows that cover output rows [start, end)
        y = torch.einsum("ik,nkm->nim", w1[first:last], t).reshape(x.shape[0], -1)
        return y[:, start - first * out2 : end - first * out2]

    def _loha(self, x: torch.Tensor) -> list[torch.Tensor]:
        d = x.dtype
        a1, b1, a2, b2 = (self._get(r, d) for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])  # (r1*r2, in)
        z = x @ down.T
        out = []
        for start, end in self.rows:
            up = (a1[start:end, :, None] * a2[start:end, None, :]).reshape(end - start, -1)  # (rows, r1*r2)
            out.append(z @ up.T)
        return out


class FactoredDeltaLayer(nn.Module, BaseTunerLayer):
    """A linear layer plus the LoKr/LoHa deltas of any number of adapters, each at its own strength."""

    adapter_layer_names = ("lycoris_factors",)
    other_param_names = ("lycoris_strength",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lycoris_factors = nn.ModuleDict()
        self.lycoris_strength: dict[str, float] = {}
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters = []

    def add(self, adapter: str, part: FactoredPart) -> None:
        self.lycoris_factors[adapter] = _Factors(part)
        self.lycoris_strength[adapter] = 1.0
        self._active_adapter = [*self.active_adapters, adapter]

    def set_scale(self, adapter: str, scale: float) -> None:  # what diffusers' set_adapters calls for the strength
        if adapter in self.lycoris_strength:
            self.lycoris_strength[adapter] = float(scale)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            strength = self.lycoris_strength.get(adapter, 0.0)
            if strength:  # strength 0 adds nothing, not even a rounding: off stays bit-identical
                result = result + strength * self.lycoris_factors[adapter](x).to(result.dtype)
        return result


def _find(module: nn.Module) -> FactoredDeltaLayer | None:
    """Our layer at or below a module (PEFT wraps it when a LoRA later targets the same module)."""
    while not isinstance(module, FactoredDeltaLayer):
        module = getattr(module, "base_layer", None)
        if module is None:
            return None
    return module


def _name(model: nn.Module, module: str) -> str:
    # transformers 5's CLIPTextModel has no text_model wrapper; LoRA keys (diffusers' naming) still do
    return module if hasattr(model, "text_model") else module.removeprefix("text_model.")


def attach(model: nn.Module, parts: list[FactoredPart], adapter: str) -> None:
    """Add each part to its module of `model` under the adapter's name (wrapping the module the first time)."""
    for part in parts:
        parent_name, _, child = _name(model, part.module).rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        layer = _find(module)
        if layer is None and isinstance(getattr(module, "base_layer", None), nn.Module):
            # a PEFT LoRA layer stays outermost (where diffusers and our checks look for lora_A): wrap what it wraps
            layer = module.base_layer = FactoredDeltaLayer(module.base_layer)
        elif layer is None:
            layer = FactoredDeltaLayer(module)
            setattr(parent, child, layer)
        layer.add(adapter, part)


def attached(model: nn.Module, parts: list[FactoredPart], adapter: str) -> list[str]:
    """The parts' modules that do not hold the adapter (empty when every part attached)."""
    missing = []
    for part in parts:
        layer = _find(model.get_submodule(_name(model, part.module)))
        if layer is None or adapter not in layer.lycoris_factors:
            missing.append(part.module)
    return missing
