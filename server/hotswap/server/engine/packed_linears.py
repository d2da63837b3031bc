"""bf16 linears on CPU with their weights packed once for oneDNN.

torch's `F.linear` on a bf16 CPU tensor hands oneDNN a plain [out, in] weight, which
oneDNN reorders into its blocked (AMX / AVX-512) layout on every call: a decode step
reads and rewrites every weight of the model before multiplying. Packing each weight
once at load (what Inductor's CPU weight prepacking does) skips that: one pass over
the default model's 211 linears at 64 tokens takes about a third less time
(bench/bench_engine.py's "model order" rows in bench/RESULTS.md).

Only bf16 on CPU: the fp32 path is the fidelity reference and stays exactly torch's
own, and quantized linears (bitsandbytes) are other classes. The packed copy is
extra memory (the plain weight stays: DoRA folds, adapter checks and callers still
read `linear.weight`), about the size of the model's linear weights; `prepack_linears=False`
(`--no-prepack-linears`) turns it off. A linear keeps its module, name and hooks; only
its forward changes.

Sibling linears that read the same input — a layer's q/k/v projections, and its
gate/up projections — are packed as one weight of their stacked outputs and run as
one matmul when the first of them is called; the others take their slices of that
output (only when called with the very same input tensor on the same thread:
anything else computes anew). One wide matmul instead of three narrow ones
at decode's 64 tokens (q 576 + k 192 + v 192 outputs on the default model) takes about
half the time (`bench/token_counts.py`): 0.6–2 ms of a ~43 ms decode step of 64 rows, and
~6% of a 64-row prefill step with gate/up (`bench/sibling_linears.py`)."""
from __future__ import annotations

import threading

import torch
from torch import nn

_PACKED = "_hotswap_packed_weight"


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    """A bf16 [out, in] weight in oneDNN's blocked layout (an opaque mkldnn tensor), chosen for
    `batch_hint` tokens (any count works)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] bf16 on CPU -> [..., out]: F.linear with a weight from pack_weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _PackedForward:
    """Replaces one nn.Linear's forward: x [..., in] -> [..., out], as F.linear. Anything but
    bf16 CPU inference (a caller training on the same model, another dtype) takes F.linear."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor) -> None:
        self.linear, self.packed = linear, packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        if not _runs_packed(x):
            return nn.functional.linear(x, lin.weight, lin.bias)
        return packed_linear(x, self.packed, lin.bias)


def _runs_packed(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Child linears of one module that models call on the same input, one after the other."""


class _Siblings:
    """Linears packed as one weight of their stacked outputs. The first member called computes
    every member's output; each other member then takes its slice if it is called with the same
    input tensor on the same thread (its slice is handed out once)."""

    def __init__(self, members: list[nn.Linear], batch_hint: int) -> None:
        self.members = members
        self.widths = [m.out_features for m in members]
        self.packed = pack_weight(torch.cat([m.weight for m in members]), batch_hint)  # [Σ out, in]
        biases = [m.bias for m in members]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else m.weight.new_zeros(m.out_features) for m, b in zip(members, biases)])
        self._state: tuple | None = None
        """(input, thread, [slice or None per member]): one attribute, read and replaced whole."""

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        # Inference tensors keep no version counter, so an in-place change of x between the
        # members' calls would go unseen: no model does that to the input of its projections.
        thread, state = threading.get_ident(), self._state
        if state is not None and state[0] is x and state[1] == thread and state[2][index] is not None:
            parts = state[2]
        else:
            parts = list(packed_linear(x, self.packed, self.bias).split(self.widths, dim=-1))  # each [..., out_i], strided
            self._state = (x, thread, parts)
        y, parts[index] = parts[index], None
        if all(p is None for p in parts):
            self._state = None
        return y

    def release(self) -> None:
        """Drops slices nobody took (and the input they hold on to)."""
        self._state = None


class _SiblingForward:
    """Replaces the forward of one linear of a `_Siblings` group: x [..., in] -> [..., out]."""

    def __init__(self, group: _Siblings, index: int) -> None:
        self.group, self.index = group, index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not _runs_packed(x):
            lin = self.group.members[self.index]
            return nn.functional.linear(x, lin.weight, lin.bias)
        return self.group.output(self.index, x)


def _sibling_groups(model: nn.Module) -> list[list[nn.Linear]]:
    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if all(_packable(m) and not hasattr(m, _PACKED) for m in members) \
                    and len({m.in_features for m in members}) == 1 and len({id(m) for m in members}) == len(members):
                groups.append(members)
    return groups


def _packable(m) -> bool:
    return type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"


@torch.no_grad()
def pack_linears(model: nn.Module, batch_hint: int) -> tuple[int, int]:
    """Pack every bf16 nn.Linear of `model` (once: a model shared by several engines is packed
    by the first), siblings (SIBLINGS) as one weight; returns how many linears run packed and the
    bytes this call added (0 when an earlier engine packed them). `batch_hint`: the token count
    the layout is chosen for."""
    packed = nbytes = 0
    for members in _sibling_groups(model):
        group = _Siblings(members, batch_hint)
        for i, m in enumerate(members):
            setattr(m, _PACKED, group)
            m.forward = _SiblingForward(group, i)
            nbytes += m.weight.numel() * m.weight.element_size()
    for m in model.modules():
        if not _packable(m):
            continue
        if not hasattr(m, _PACKED):
            weight = pack_weight(m.weight, batch_hint)
            setattr(m, _PACKED, weight)
            m.forward = _PackedForward(m, weight)
            nbytes += m.weight.numel() * m.weight.element_size()
        packed += 1
    return packed, nbytes


def sibling_groups(model: nn.Module) -> list[_Siblings]:
    """The sibling groups packed on `model`; a caller releases them after each forward, so
    slices a model never asked for (and the input they hold on to) do not outlive it."""
    groups = {id(g): g for m in model.modules() if isinstance(g := getattr(m, _PACKED, None), _Siblings)}
    return list(groups.values())
