"""Per-row LoRA inside every linear of the base model.

Each linear of the decoder gets a forward hook once at start-up. The base matmul runs
once for the whole batch; each row then adds scale * B(A x) for its own
adapter. Two ways to apply it, chosen once per forward (`LoraBatch`):

- grouped: one pair of small matmuls per distinct adapter on its rows — best
  when a few adapters share the batch;
- slotted: every row's weights sit in a per-row slot laid out like the KV
  cache (row i in slot i, copied once when the row joins), so the whole batch
  takes two batched matmuls per linear whatever the number of adapters
  (BGMV-style, without a per-step gather).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.weights import LoraWeights


@dataclass
class LoraBatch:
    """How one forward applies LoRA; computed once per forward, read by every linear."""

    groups: list[tuple[LoraWeights, torch.Tensor | None]] = field(default_factory=list)
    """grouped mode: (adapter, row indices [n] into the batch); None means every row."""
    slots: slice | None = None
    """slotted mode: the batch's rows are these LoRA row slots."""
    rank: int = 0
    """slotted mode: the highest rank in the batch (slots are padded with zeros beyond a row's rank)."""

    @classmethod
    def plan(cls, row_adapters: list[LoraWeights | None], first_slot: int, max_groups: int, device: torch.device) -> "LoraBatch":
        by_adapter: dict[int, tuple[LoraWeights, list[int]]] = {}
        for i, w in enumerate(row_adapters):
            if w is not None:
                by_adapter.setdefault(id(w), (w, []))[1].append(i)
        if len(by_adapter) > max_groups:
            rank = max(m.rank for w, _ in by_adapter.values() for m in w.modules.values())
            return cls(slots=slice(first_slot, first_slot + len(row_adapters)), rank=rank)
        groups = []
        for w, rows in by_adapter.values():
            index = None if len(rows) == len(row_adapters) else torch.tensor(rows, device=device)
            groups.append((w, index))
        return cls(groups)


class LoraRowSlots:
    """Per-row copies of each running row's LoRA weights, one slot per KV slot.

    Tensors exist only for linears some admitted adapter has targeted; the rank
    axis grows to the highest rank seen. The scale is folded into B."""

    def __init__(self, max_rows: int, device: torch.device, dtype: torch.dtype) -> None:
        self.max_rows, self.device, self.dtype = max_rows, device, dtype
        self.rank_cap = 0
        self.a: dict[str, torch.Tensor] = {}  # name -> [max_rows, rank_cap, in]
        self.b: dict[str, torch.Tensor] = {}  # name -> [max_rows, out, rank_cap]

    def _grow_rank(self, rank: int) -> None:
        if rank <= self.rank_cap:
            return
        for name in self.a:
            a, b = self.a[name], self.b[name]
            self.a[name] = torch.cat([a, a.new_zeros(a.shape[0], rank - self.rank_cap, a.shape[2])], dim=1)
            self.b[name] = torch.cat([b, b.new_zeros(b.shape[0], b.shape[1], rank - self.rank_cap)], dim=2)
        self.rank_cap = rank

    def assign(self, slot: int, weights: LoraWeights | None) -> None:
        modules = weights.modules if weights is not None else {}
        if modules:
            self._grow_rank(max(m.rank for m in modules.values()))
        for name, m in modules.items():
            if name not in self.a:
                self.a[name] = torch.zeros(self.max_rows, self.rank_cap, m.a.shape[1], device=self.device, dtype=self.dtype)
                self.b[name] = torch.zeros(self.max_rows, m.b.shape[0], self.rank_cap, device=self.device, dtype=self.dtype)
        for name in self.a:
            m = modules.get(name)
            self.a[name][slot].zero_()
            self.b[name][slot].zero_()
            if m is not None:
                self.a[name][slot, : m.rank] = m.a
                self.b[name][slot, :, : m.rank] = m.b * m.scale

    def move(self, src: int, dst: int) -> None:
        for name in self.a:
            self.a[name][dst] = self.a[name][src]
            self.b[name][dst] = self.b[name][src]


class LoraContext:
    """Shared by every wrapped linear; the runner sets `batch` before each forward."""

    def __init__(self, slots: LoraRowSlots) -> None:
        self.batch = LoraBatch()
        self.slots = slots


class LoraDelta:
    """Forward hook on one base linear: adds each row's LoRA delta to the shared base output.

    A hook rather than a wrapper module keeps the model's module tree exactly as
    transformers built it, so adapter validation and PEFT's module paths see the
    same names and types."""

    def __init__(self, name: str, ctx: LoraContext) -> None:
        self.name = name
        self.ctx = ctx

    def __call__(self, module: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
        # The base output is a fresh tensor, so the deltas accumulate into it in place
        # (fused multiply-adds: on CPU the per-op dispatch, not the FLOPs, is the cost).
        x = args[0]  # (B, T, in); y (B, T, out)
        batch = self.ctx.batch
        if batch.slots is not None:
            a = self.ctx.slots.a.get(self.name)
            if a is not None:
                a = a[batch.slots, : batch.rank]  # (B, r, in)
                b = self.ctx.slots.b[self.name][batch.slots, :, : batch.rank]  # (B, out, r), scale folded in
                y.baddbmm_(torch.bmm(x.to(a.dtype), a.transpose(1, 2)).to(y.dtype), b.transpose(1, 2).to(y.dtype))
            return y
        for weights, rows in batch.groups:
            m = weights.modules.get(self.name)
            if m is None:
                continue
            if rows is None:
                y2 = y.view(-1, y.shape[-1])  # (B*T, out)
                y2.addmm_(x.reshape(-1, x.shape[-1]) @ m.a.T, m.b.T, alpha=m.scale)
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ m.a.T) @ m.b.T, alpha=m.scale)
        return y


def attach_lora(model: nn.Module, ctx: LoraContext) -> list[str]:
    """Hook every linear except the output head (bitsandbytes' Linear4bit and
    Linear8bitLt subclass nn.Linear); returns the hooked module paths."""
    head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            module.register_forward_hook(LoraDelta(name, ctx))
            names.append(name)
    return names
