"""Per-row LoRA inside every linear of the base model.

Each linear of the decoder is wrapped once at start-up. The base matmul runs
once for the whole batch; then each LoRA adapter present adds
scale * B(A x) to its own rows. Which rows use which adapter is computed once
per forward (`LoraBatch`), not per layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.weights import LoraWeights


@dataclass
class LoraBatch:
    groups: list[tuple[LoraWeights, torch.Tensor | None]] = field(default_factory=list)
    """(adapter weights, row indices [n] into the batch); None means every row."""

    @classmethod
    def from_rows(cls, row_adapters: list[LoraWeights | None], device: torch.device) -> "LoraBatch":
        by_adapter: dict[int, tuple[LoraWeights, list[int]]] = {}
        for i, w in enumerate(row_adapters):
            if w is not None:
                by_adapter.setdefault(id(w), (w, []))[1].append(i)
        groups = []
        for w, rows in by_adapter.values():
            index = None if len(rows) == len(row_adapters) else torch.tensor(rows, device=device)
            groups.append((w, index))
        return cls(groups)


class LoraContext:
    """Shared by every wrapped linear; the runner sets `batch` before each forward."""

    def __init__(self) -> None:
        self.batch = LoraBatch()


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, name: str, ctx: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, in)
        y = self.base(x)  # (B, T, out)
        for weights, rows in self.ctx.batch.groups:
            m = weights.modules.get(self.name)
            if m is None:
                continue
            if rows is None:
                y = y + ((x @ m.a.T) @ m.b.T) * m.scale
            else:
                y = y.index_add(0, rows, ((x.index_select(0, rows) @ m.a.T) @ m.b.T) * m.scale)
        return y


def is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear.
    return isinstance(module, nn.Linear)


def wrap_linears(model: nn.Module, ctx: LoraContext) -> dict[str, MultiLoraLinear]:
    """Wrap every linear except the output head; returns the wrappers by module path."""
    head = model.get_output_embeddings()
    targets = [(n, m) for n, m in model.named_modules() if is_linear(m) and m is not head]
    wrapped = {}
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MultiLoraLinear(module, name, ctx)
        setattr(parent, attr, wrapper)
        wrapped[name] = wrapper
    return wrapped
