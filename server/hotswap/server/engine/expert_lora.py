"""LoRA on MoE expert and router weights (PEFT's target_parameters), per token, by slot.

PEFT adds expert e's delta scale · B_e A_e to its slice of the fused weight (lora.ParamWrapper), so the
pair (token t, chosen expert e) computes W_e x + scale · B[a, e] (A[a, e] x) for t's adapter slot a —
on gate_up before the gate and activation, on down before the routing weight — and a router computes
its logits with W + scale · B A before its softmax / top-k. Both are the LoRA shrink/expand of
engine/lora.py with a different index: slot tables hold every expert of the first `max_expert_loras`
LoRA slots (lora_slots.py keeps expert adapters there), [max_expert_loras · E, rank_cap, features], and a
pair's index is a · E + e (-1 when t's row has no slot, or one past those), so the same kernels serve every
backend and a step stays free of host syncs.

- Experts: a module a loaded adapter first targets gets `ExpertsLora` as its forward. Steps without
  a row whose adapter targets it run the model's own experts forward untouched; the others run the grouped computation of
  transformers' default implementation (integrations/moe.py, grouped_mm_experts_forward) — the same
  sort, grouped matmuls and sum, so tokens of rows without an expert adapter get exactly its numbers —
  with the pairs' deltas added between its steps.
- Routers: `RouterLora` runs the router's own forward with `_LinearDelta` watching it, which adds the
  delta to the one F.linear(x, weight) the router computes (model/experts.py found exactly one)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.integrations.moe import _grouped_linear  # the grouped matmul (and its CPU fallback) of grouped_mm

from ..adapters.weights import ParamLoraWeights
from ..model.experts import ParamFeatures, WeightWatch, is_experts, param_targets
from . import kernels
from .lora import LoraContext, LoraStep, add_delta, grow_rank_axis, growth_bytes


class ParamSlots:
    """Stacked target-parameter LoRA weights of the LoRA slots 0 .. capacity - 1, for parameters some loaded
    adapter targets. Slot s, expert e sits at row s · E + e; ranks grow as LoraSlots' do."""

    def __init__(self, features: dict[str, ParamFeatures], capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        self.features = features
        self.capacity, self.device, self.dtype = capacity, device, dtype
        self.on_new_owner: Callable[[str], None] | None = None
        """Called with a module's path when a loaded adapter is the first to target one of its parameters."""
        self.rank_cap = 0
        self.layout_version = 0
        self.a: dict[str, torch.Tensor] = {}  # key -> [capacity · E, rank_cap, in]
        self.b: dict[str, torch.Tensor] = {}  # key -> [capacity · E, rank_cap, out], scale folded in
        self.ranks: dict[str, torch.Tensor] = {}  # key -> [capacity · E] int32, 0 = not targeted
        self._host_ranks: dict[str, list[int]] = {}  # key -> [capacity]
        self._owners: set[str] = set()

    def _check_fits(self, params: dict[str, ParamLoraWeights]) -> None:
        for key, p in params.items():
            f = self.features.get(key)
            if f is None or tuple(p.a.shape) != (f.experts, p.rank, f.in_features) or tuple(p.b.shape) != (f.experts, f.out_features, p.rank):
                raise ValueError(f"{key}: LoRA A {tuple(p.a.shape)} / B {tuple(p.b.shape)} do not fit "
                                 + (f"its {f.experts} expert(s) of {f.in_features}→{f.out_features}" if f else "any parameter the engine serves"))

    def load(self, slot: int, params: dict[str, ParamLoraWeights]) -> None:
        """Put an adapter's parameter deltas into `slot`, clearing what a previous adapter left there."""
        self._check_fits(params)
        if slot >= self.capacity:
            if params:
                raise ValueError(f"LoRA slot {slot} holds no expert / router LoRA: only slots below max_expert_loras "
                                 f"({self.capacity}) do")
            return
        rank = max((p.rank for p in params.values()), default=0)
        if rank > self.rank_cap:
            self.rank_cap = grow_rank_axis(self.a, self.b, self.rank_cap, rank)
            self.layout_version += 1
        for key in params:
            if key not in self.a:
                f = self.features[key]
                rows = self.capacity * f.experts
                self.a[key] = torch.zeros(rows, self.rank_cap, f.in_features, device=self.device, dtype=self.dtype)
                self.b[key] = torch.zeros(rows, self.rank_cap, f.out_features, device=self.device, dtype=self.dtype)
                self.ranks[key] = torch.zeros(rows, dtype=torch.int32, device=self.device)
                self._host_ranks[key] = [0] * self.capacity
                self.layout_version += 1
                owner = key.rsplit(".", 1)[0]
                if owner not in self._owners and self.on_new_owner is not None:
                    self._owners.add(owner)
                    self.on_new_owner(owner)
        for key in self.a:
            p, experts = params.get(key), self.features[key].experts
            rows, before = slice(slot * experts, (slot + 1) * experts), self._host_ranks[key][slot]
            r = 0 if p is None else p.rank
            if p is not None:
                self.a[key][rows, :r] = p.a
                self.b[key][rows, :r] = (p.b.float() * p.scale).transpose(1, 2)  # [E, r, out]
            if before > r:
                self.a[key][rows, r:before].zero_()
                self.b[key][rows, r:before].zero_()
            self.ranks[key][rows] = r
            self._host_ranks[key][slot] = r

    def growth_bytes(self, params: dict[str, ParamLoraWeights]) -> int:
        """What load(_, params) would allocate (rank growth, newly targeted parameters)."""
        rank = max((p.rank for p in params.values()), default=0)
        new = [(self.capacity * f.experts, f.in_features + f.out_features)
               for key in params if key not in self.a and (f := self.features.get(key)) is not None]
        return growth_bytes(self.a, self.b, self.rank_cap, rank, new, self.dtype)

    def table_bytes(self, rank: int) -> int:
        """Bytes of the slot tables for every parameter the engine serves, at `rank`'s capacity: what a
        first adapter of that rank targeting all of them allocates (the tables hold every slot at once)."""
        every = [(self.capacity * f.experts, f.in_features + f.out_features) for f in self.features.values()]
        return growth_bytes({}, {}, 0, rank, every, self.dtype)

    def used_by(self, step: LoraStep, keys: tuple[str, ...]) -> bool:
        """Whether a row of the step has an adapter targeting one of `keys` (True where the step does not say
        which slots it holds: a captured decode step must take the same path whatever rows fill it)."""
        if step.host_slots is None:
            return any(k in self.a for k in keys)
        return any(s < self.capacity and self._host_ranks[k][s] > 0 for k in keys if k in self.a for s in step.host_slots)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.a, self.b) for t in d.values())


def _pair_index(token_slots: torch.Tensor, capacity: int, experts: int, expert: torch.Tensor | int = 0) -> torch.Tensor:
    """[n] int32 row of each (token, expert) pair in the slot tables: slot · E + expert, -1 without a slot or
    with one past the expert slots. token_slots [n] (of each pair's token), expert [n] or one expert."""
    slots = token_slots.long()
    return torch.where((slots >= 0) & (slots < capacity), slots * experts + expert, -1).to(torch.int32)


class ExpertsLora:
    """The forward of one fused-experts module (transformers' use_experts_implementation layout)."""

    def __init__(self, path: str, module: nn.Module, ctx: LoraContext) -> None:
        self.path, self.module, self.ctx = path, module, ctx
        self.original = module.forward
        self.up_key = f"{path}.{'gate_up_proj' if module.has_gate else 'up_proj'}"
        self.down_key = f"{path}.down_proj"

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        step, params = self.ctx.step, self.ctx.params
        if step is None or not params.used_by(step, (self.up_key, self.down_key)):
            return self.original(hidden_states, top_k_index, top_k_weights)
        m = self.module
        n, k = top_k_index.shape  # hidden_states [n, hidden]; top_k_index, top_k_weights [n, k]
        experts = (m.gate_up_proj if m.has_gate else m.up_proj).shape[0]
        step = step.over(n, self.path)
        expert, perm = torch.sort(top_k_index.reshape(-1))  # [S = n·k] pairs grouped by expert
        token = perm // k  # [S]
        x = hidden_states[token]  # [S, hidden]
        index = _pair_index(step.token_slots[token], params.capacity, experts, expert)
        scales = None if step.token_scales is None else step.token_scales[token]  # [S, 1]
        plan = kernels.lora_plan(index, params.capacity * experts) if step.backend == "triton" else None
        # As grouped_mm_experts_forward: histc, not bincount (no host sync; CPU histc takes floats).
        counts = torch.histc(expert.float() if x.device.type in ("cpu", "mps") else expert.int(), bins=experts, min=0, max=experts - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E]

        def linear(h: torch.Tensor, name: str, key: str) -> torch.Tensor:
            bias = getattr(m, f"{name}_bias")[expert] if m.has_bias else None
            y = _grouped_linear(h, getattr(m, name), offsets, bias=bias, is_transposed=m.is_transposed)  # [S, out]
            if key in params.a:
                add_delta(y, h, params.a[key], params.b[key], params.ranks[key], index, scales, step.backend, plan)
            return y

        h = linear(x, self.up_key.rsplit(".", 1)[1], self.up_key)  # [S, 2·inter] or [S, inter]
        h = m._apply_gate(h) if m.has_gate else m.act_fn(h)  # [S, inter]
        y = linear(h, "down_proj", self.down_key)  # [S, hidden]
        if m.has_post_expert_norm:
            y = m.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
        return y[inverse].view(n, k, -1).sum(dim=1).to(hidden_states.dtype)  # [n, hidden]


class _LinearDelta(WeightWatch):
    """While active, F.linear(x, weight or its cast) gets `delta(x [n, in], y [n, out])` added to its result in place."""

    def __init__(self, weight: torch.Tensor, delta: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        super().__init__(weight)
        self.delta = delta

    def on_linear(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.delta(x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]))


class RouterLora:
    """The forward of one router: its own, with its weight's LoRA delta added to its logits."""

    def __init__(self, path: str, module: nn.Module, ctx: LoraContext) -> None:
        self.path, self.module, self.ctx = path, module, ctx
        self.original = module.forward
        self.key = f"{path}.weight"

    def __call__(self, *args, **kwargs):
        step, params = self.ctx.step, self.ctx.params
        if step is None or not params.used_by(step, (self.key,)):
            return self.original(*args, **kwargs)

        def delta(x: torch.Tensor, y: torch.Tensor) -> None:
            s = step.over(x.shape[0], self.path)
            index = _pair_index(s.token_slots, params.capacity, 1)
            plan = kernels.lora_plan(index, params.capacity) if s.backend == "triton" else None
            add_delta(y, x, params.a[self.key], params.b[self.key], params.ranks[self.key], index, s.token_scales, s.backend, plan)

        with _LinearDelta(self.module.weight, delta):
            return self.original(*args, **kwargs)


def attach_param_lora(model: nn.Module, ctx: LoraContext, expert_slots: int) -> None:
    """Slots for the parameters of `model` LoRA may target (model/experts.py); each module's forward is
    replaced when an adapter first targets one of its parameters, so models without them pay nothing."""
    slots = ctx.slots
    ctx.params = ParamSlots(param_targets(model).features, min(expert_slots, slots.max_loras), slots.device, slots.dtype)
    modules = dict(model.named_modules())

    def install(path: str) -> None:
        module = modules[path]
        module.forward = (ExpertsLora if is_experts(module) else RouterLora)(path, module, ctx)

    ctx.params.on_new_owner = install
