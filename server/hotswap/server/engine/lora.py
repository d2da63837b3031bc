"""LoRA for every row of the packed batch at once, by per-token slot index.

Each adapter in use sits once in a device slot (`LoraSlots`): for every linear
some adapter targets, A [slots, rank_cap, in] and B [slots, rank_cap, out] with
the adapter's scale folded into B. Each such linear's forward, once the linear
has run, adds B[s] (A[s] x) to every token whose row runs the adapter in slot s —
shrink then expand, SGMV/BGMV semantics — in one kernel call whatever the number of
distinct adapters in the batch; no weights are copied per row or per step. A
linear's forward is wrapped when the first adapter targeting it is loaded, so
base-only models pay nothing.

Replacing the instance's forward (as packed_linears.py does) rather than wrapping the
module keeps the model's module tree exactly as transformers built it, so adapter
validation and PEFT's module paths see the same names and types; and unlike forward
hooks it costs no pass through torch's hook machinery on each of a step's ~200 calls.

The same slots carry the adapter types that change a linear beyond a low-rank delta:
DoRA (a per-output multiplier and shift, derived in `lora_fold`), lora_B's bias (a shift)
and IA3 (a multiplier on the output, or on the input of feedforward modules). Tokens of
other rows gather ones and zeros, so the mix of types never branches the forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..adapters.weights import LoraWeights
from ..model.linears import linear_features, lora_targetable
from . import kernels
from .device_memory import ensure_room
from .lora_fold import fold

if TYPE_CHECKING:
    from .expert_lora import ParamSlots


MIN_RANK_CAP = 8
"""The smallest rank capacity the slots are allocated with."""


def rank_capacity(rank: int) -> int:
    """The power of two at or above `rank`, at least MIN_RANK_CAP."""
    return max(MIN_RANK_CAP, 1 << (rank - 1).bit_length())


def growth_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], cap: int, rank: int,
                 new: list[tuple[int, int]], dtype: torch.dtype) -> int:
    """Bytes a load allocates: every table of `a` and `b` ([slots, cap, features]) again when `rank` needs a higher
    capacity (grow_rank_axis), and the tables it adds, `new` = [(slots, in + out)], at the capacity it leaves."""
    new_cap = cap if rank <= cap else rank_capacity(rank)
    grown = sum(t.shape[0] * new_cap * t.shape[2] for d in (a, b) for t in d.values()) if new_cap > cap else 0
    return (grown + sum(rows * new_cap * features for rows, features in new)) * dtype.itemsize


def grow_rank_axis(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], cap: int, rank: int) -> int:
    """Pads every tensor of `a` and `b` ([slots, cap, features]) with zero rank rows, in place of the dicts'
    values, to rank_capacity(rank); returns the new capacity."""
    new = rank_capacity(rank)
    for table in (a, b):
        for name, t in table.items():
            table[name] = torch.cat([t, t.new_zeros(t.shape[0], new - cap, t.shape[2])], dim=1)
    return new


class LoraSlots:
    """Stacked LoRA weights of up to `max_loras` adapters. Tensors exist only for linears
    some loaded adapter targets; the rank axis grows to the power of two at or above the
    highest rank loaded (at least MIN_RANK_CAP): growing copies every slot tensor, so ranks
    8, 16, ..., 64 arriving one by one cost four allocations, not eight (a growth took
    150-700 ms of a step on 2 cores), for at most twice the exact rows. The kernels read
    only a slot's own rank rows, so spare capacity costs memory, not time.

    Per-output multipliers and shifts (DoRA, lora_bias, IA3 on outputs) and per-input
    multipliers (IA3 on feedforward inputs) exist only for linears some loaded adapter
    needs them on; they carry one extra row, `max_loras`, of ones / zeros that tokens of
    rows without a LoRA slot gather, so every token takes the same path."""

    def __init__(self, linears: dict[str, nn.Module], max_loras: int, device: torch.device, dtype: torch.dtype) -> None:
        self.linears = linears
        """Every linear (nn.Linear or Conv1D) an adapter may target, by module path (the output head excluded)."""
        self.features = {name: linear_features(m) for name, m in linears.items()}  # name -> (in, out)
        self.max_loras, self.device, self.dtype = max_loras, device, dtype
        self.on_new_target: Callable[[str], None] | None = None
        """Called when a loaded adapter is the first to target a linear (attach_lora wraps its forward)."""
        self.on_new_input_scale: Callable[[str], None] | None = None
        """Called when a loaded adapter is the first to scale a linear's input (IA3 feedforward)."""
        self.rank_cap = 0
        self.layout_version = 0
        """Bumped whenever a slot tensor is (re)allocated (rank growth, a newly targeted linear, new per-slot
        vectors): a captured CUDA graph holds the old tensors' addresses (static_decode.py)."""
        self.a: dict[str, torch.Tensor] = {}  # name -> [max_loras, rank_cap, in]
        self.b: dict[str, torch.Tensor] = {}  # name -> [max_loras, rank_cap, out]: rows of outputs, read only up to a slot's rank
        self.ranks: dict[str, torch.Tensor] = {}  # name -> [max_loras] int32, 0 = not targeted
        self._host_ranks: dict[str, list[int]] = {}  # the same on the host: what a reload must clear
        self.out_mult: dict[str, torch.Tensor] = {}  # name -> [max_loras + 1, out], ones where unused
        self.out_shift: dict[str, torch.Tensor] = {}  # name -> [max_loras + 1, out], zeros where unused (scaled per token)
        self.in_mult: dict[str, torch.Tensor] = {}  # name -> [max_loras + 1, in], ones where unused

    def _grow_rank(self, rank: int) -> None:
        if rank <= self.rank_cap:
            return
        self.rank_cap = grow_rank_axis(self.a, self.b, self.rank_cap, rank)
        self.layout_version += 1

    def _check_fits(self, weights: LoraWeights) -> None:
        for name, m in weights.modules.items():
            fan = self.features.get(name)
            if fan is None or m.a.shape[1] != fan[0] or m.b.shape[0] != fan[1] or m.b.shape[1] != m.rank:
                raise ValueError(f"{name}: LoRA A {tuple(m.a.shape)} / B {tuple(m.b.shape)} do not fit "
                                 + (f"the linear ({fan[0]} in, {fan[1]} out)" if fan else "any linear of the base model"))

    def growth_bytes(self, weights: LoraWeights) -> int:
        """What load(_, weights) would allocate (rank growth, newly targeted linears; not the small per-slot vectors)."""
        rank = max((m.rank for m in weights.modules.values()), default=0)
        new = [(self.max_loras, sum(self.features[name])) for name in weights.modules if name not in self.a and name in self.features]
        return growth_bytes(self.a, self.b, self.rank_cap, rank, new, self.dtype)

    def _vectors(self, table: dict[str, torch.Tensor], name: str, width: int, fill: float) -> None:
        if name not in table:
            table[name] = torch.full((self.max_loras + 1, width), fill, device=self.device, dtype=self.dtype)
            self.layout_version += 1

    def load(self, slot: int, weights: LoraWeights) -> None:
        """Put an adapter's weights into `slot` (whatever was there before is overwritten)."""
        self._check_fits(weights)
        folded = {name: fold(m, self.linears[name]) for name, m in weights.modules.items()}  # before any slot changes
        self._grow_rank(max((m.rank for m in weights.modules.values()), default=0))
        for name, m in weights.modules.items():
            fan_in, fan_out = self.features[name]
            if name not in self.a:
                self.a[name] = torch.zeros(self.max_loras, self.rank_cap, fan_in, device=self.device, dtype=self.dtype)
                self.b[name] = torch.zeros(self.max_loras, self.rank_cap, fan_out, device=self.device, dtype=self.dtype)
                self.ranks[name] = torch.zeros(self.max_loras, dtype=torch.int32, device=self.device)
                self._host_ranks[name] = [0] * self.max_loras
                self.layout_version += 1
                if self.on_new_target is not None:
                    self.on_new_target(name)
            _, mult, shift = folded[name]
            if mult is not None or shift is not None:
                self._vectors(self.out_mult, name, fan_out, 1.0)
                self._vectors(self.out_shift, name, fan_out, 0.0)
            if m.in_scale is not None and name not in self.in_mult:
                self._vectors(self.in_mult, name, fan_in, 1.0)
                if self.on_new_input_scale is not None:
                    self.on_new_input_scale(name)
        # Rows past a slot's rank stay zero; only those the previous adapter used are cleared (zeroing
        # every linear's whole slot was ~5 ms of a 3-8 ms load at rank capacity 64).
        for name in self.a:
            m = weights.modules.get(name)
            rank, before = (0 if m is None else m.rank), self._host_ranks[name][slot]
            if m is not None:
                self.a[name][slot, :rank] = m.a
                self.b[name][slot, :rank] = folded[name][0]
            if before > rank:
                self.a[name][slot, rank:before].zero_()
                self.b[name][slot, rank:before].zero_()
            self.ranks[name][slot] = rank
            self._host_ranks[name][slot] = rank
        for name in self.out_mult:
            mult, shift = folded[name][1:] if name in folded else (None, None)
            self.out_mult[name][slot] = 1.0 if mult is None else mult
            self.out_shift[name][slot] = 0.0 if shift is None else shift
        for name in self.in_mult:
            m = weights.modules.get(name)
            self.in_mult[name][slot] = 1.0 if m is None or m.in_scale is None else m.in_scale

    @property
    def nbytes(self) -> int:
        tables = (self.a, self.b, self.out_mult, self.out_shift, self.in_mult)
        return sum(t.numel() * t.element_size() for d in tables for t in d.values())


@dataclass
class LoraStep:
    """Set by the runner around one forward."""

    token_slots: torch.Tensor
    """[num_tokens] int32: the LoRA slot of each token's row, -1 for rows without LoRA."""
    backend: str
    vector_rows: torch.Tensor
    """[num_tokens] int64: each token's row in the per-slot vectors (max_loras for rows without LoRA)."""
    token_scales: torch.Tensor | None = None
    """[num_tokens, 1] float32 per-request LoRA scale of each token's row; None when every row uses 1."""
    plan: kernels.LoraPlan | None = None
    """The Triton kernels' grouping of tokens by slot, built once for every linear of the step."""
    one_row: bool = False
    """Every token is one row's (the model's own attention runs a row at a time, own_attention.py): a linear
    the model runs over more than the new tokens — the row's cached past too, as DeepSeek's kv_b_proj over
    its latent cache or Doge's dt_proj over its values — still belongs wholly to that row and its adapter."""
    max_loras: int = 0
    host_slots: frozenset[int] | None = None
    """The slots of token_slots, known on the host; None where the step must not depend on them (a captured graph)."""

    @classmethod
    def of(cls, token_slots: torch.Tensor, token_scales: torch.Tensor | None, max_loras: int, backend: str,
           one_row: bool = False, host_slots: frozenset[int] | None = None) -> "LoraStep":
        rows = torch.where(token_slots >= 0, token_slots, max_loras).long()
        plan = kernels.lora_plan(token_slots, max_loras) if backend == "triton" else None
        return cls(token_slots, backend, rows, None if token_scales is None else token_scales.float()[:, None], plan,
                   one_row, max_loras, host_slots)

    def over(self, n: int, name: str) -> "LoraStep":
        """This step for a linear the model ran over `n` rows: itself when n is the token count; the row's
        slot and scale repeated n times for a one-row step; anything else cannot be served exactly."""
        if n == len(self.token_slots):
            return self
        if not self.one_row or len(self.token_slots) == 0:
            raise RuntimeError(f"LoRA on {name}: the model ran it over {n} rows for {len(self.token_slots)} tokens "
                               "of several rows; per-token LoRA needs one row per token")
        scales = None if self.token_scales is None else self.token_scales[:1, 0].expand(n)
        return LoraStep.of(self.token_slots[:1].expand(n).contiguous(), scales, self.max_loras, self.backend, True, self.host_slots)


class LoraContext:
    """Shared by every wrapped linear (and every expert / router forward, expert_lora.py)."""

    def __init__(self, slots: LoraSlots) -> None:
        self.slots = slots
        self.params: ParamSlots | None = None
        """Slots of LoRA on MoE expert and router weights (target_parameters); set by expert_lora.attach_param_lora."""
        self.step: LoraStep | None = None
        """None while no row of the forward has a LoRA adapter."""

    def load(self, slot: int, weights: LoraWeights) -> None:
        """Put an adapter's weights into `slot` (whatever was there before is overwritten)."""
        if weights.params and self.params is None:
            raise ValueError(f"LoRA on parameters {sorted(weights.params)[:3]}: this engine serves none")
        # Both checked before either changes: a refused adapter leaves every slot as it was.
        slots = self.slots
        ensure_room(slots.growth_bytes(weights), slots.device, f"LoRA slot tables of {slots.max_loras} slots (--max-loras)",
                    "lower --max-loras, or serve adapters of a lower rank")
        if self.params is not None and slot < self.params.capacity:
            ensure_room(self.params.growth_bytes(weights.params), slots.device,
                        f"expert / router LoRA slot tables of {self.params.capacity} slots (--max-expert-loras), each with every expert's A and B,",
                        "lower --max-expert-loras, or serve adapters of a lower rank")
        self.slots.load(slot, weights)
        if self.params is not None:
            self.params.load(slot, weights.params)

    @property
    def layout_version(self) -> int:
        """Changes whenever a slot tensor is (re)allocated (what a captured CUDA graph must be keyed by)."""
        return self.slots.layout_version + (0 if self.params is None else self.params.layout_version)


class LoraForward:
    """Replaces one base linear's forward (the module keeps its name, type and hooks): scales each
    token's input where an adapter scales this linear's input, runs the forward it replaced, then
    applies the LoRA delta and output vectors. Each engine on the model adds its parts when a loaded
    adapter first needs them; a part does nothing outside its own engine's forwards."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inner = module.forward  # the class's forward, or another replacement (packed_linears.py)
        self.deltas: list[LoraDelta] = []
        self.input_scales: list[LoraInputScale] = []

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        for scale in self.input_scales:
            scaled = scale(self.module, (x,))
            x = x if scaled is None else scaled[0]
        y = self.inner(x, *args, **kwargs)
        for delta in self.deltas:
            y = delta(self.module, (x,), y)
        return y

    @staticmethod
    def of(module: nn.Module) -> "LoraForward":
        """The module's LoraForward, installed on the first call."""
        current = vars(module).get("forward")
        if not isinstance(current, LoraForward):
            current = LoraForward(module)
            module.forward = current
        return current


class LoraDelta:
    """After one base linear (LoraForward, or as a forward hook): applies each token's per-output multiplier
    and shift (when some adapter has them here), then adds its LoRA delta to the shared base output."""

    def __init__(self, name: str, ctx: LoraContext) -> None:
        self.name = name
        self.ctx = ctx

    def __call__(self, module: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
        step = self.ctx.step
        slots = self.ctx.slots
        a = slots.a.get(self.name) if step is not None else None
        if a is None:
            return y
        y2 = y.view(-1, y.shape[-1])  # [num_tokens, out]; the base output is fresh, so changes go in place
        step = step.over(y2.shape[0], self.name)
        mult = slots.out_mult.get(self.name)
        if mult is not None:
            shift = slots.out_shift[self.name][step.vector_rows]  # [num_tokens, out]
            if step.token_scales is not None:
                shift = shift * step.token_scales
            y2.mul_(mult[step.vector_rows].to(y2.dtype)).add_(shift.to(y2.dtype))
        if a.shape[1] == 0:  # only rank-0 adapters (IA3) loaded so far
            return y
        x = args[0].reshape(-1, args[0].shape[-1])  # [num_tokens, in]
        add_delta(y2, x, a, slots.b[self.name], slots.ranks[self.name], step.token_slots, step.token_scales, step.backend, step.plan)
        return y


def add_delta(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, index: torch.Tensor,
              scales: torch.Tensor | None, backend: str, plan: kernels.LoraPlan | None) -> None:
    """y[i] += scales[i] · B[s] (A[s] x[i]) with s = index[i] (-1: nothing), shrink then expand.
    y [n, out] (rows may be strided); x [n, in]; a [S, R, in], b [S, R, out] (scale folded in);
    ranks [S], index [n] int32; scales [n, 1] float32 or None."""
    x = x.to(a.dtype)
    if y.dtype == b.dtype:
        kernels.lora_apply(y, x, a, b, index, ranks, scales, backend=backend, plan=plan)
    else:  # e.g. an int8 base whose matmul returns another dtype than the compute dtype
        delta = torch.zeros(y.shape, device=y.device, dtype=b.dtype)
        kernels.lora_apply(delta, x, a, b, index, ranks, scales, backend=backend, plan=plan)
        y += delta.to(y.dtype)


class LoraInputScale:
    """Before one base linear (LoraForward, or as a forward pre-hook): multiplies each token's input by its
    slot's vector (IA3 feedforward)."""

    def __init__(self, name: str, ctx: LoraContext) -> None:
        self.name = name
        self.ctx = ctx

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        step = self.ctx.step
        if step is None:
            return None
        x = args[0]
        step = step.over(x.numel() // x.shape[-1], self.name)
        v = self.ctx.slots.in_mult[self.name][step.vector_rows]  # [num_tokens, in]
        return ((x.reshape(-1, x.shape[-1]) * v.to(x.dtype)).view(x.shape), *args[1:])


def lora_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear except the output head: nn.Linear (bitsandbytes' Linear4bit and Linear8bitLt subclass it)
    and Conv1D, whose forward takes the same x and gives y = x W + b (model/linears.py)."""
    return lora_targetable(model)


def attach_lora(model: nn.Module, max_loras: int, device: torch.device, dtype: torch.dtype) -> LoraContext:
    """LoRA slots for `model`; each linear's forward is wrapped when an adapter first targets it."""
    ctx = LoraContext(LoraSlots(lora_targets(model), max_loras, device, dtype))

    def on_new_target(name: str) -> None:
        LoraForward.of(ctx.slots.linears[name]).deltas.append(LoraDelta(name, ctx))

    def on_new_input_scale(name: str) -> None:
        LoraForward.of(ctx.slots.linears[name]).input_scales.append(LoraInputScale(name, ctx))

    ctx.slots.on_new_target, ctx.slots.on_new_input_scale = on_new_target, on_new_input_scale
    return ctx
