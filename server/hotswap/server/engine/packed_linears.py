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
its forward changes."""
from __future__ import annotations

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
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or torch.is_grad_enabled():
            return nn.functional.linear(x, lin.weight, lin.bias)
        return packed_linear(x, self.packed, lin.bias)


@torch.no_grad()
def pack_linears(model: nn.Module, batch_hint: int) -> tuple[int, int]:
    """Pack every bf16 nn.Linear of `model` (once: a model shared by several engines is packed
    by the first); returns how many linears run packed and the bytes this call added (0 when an
    earlier engine packed them). `batch_hint`: the token count the layout is chosen for."""
    packed = nbytes = 0
    for m in model.modules():
        if type(m) is not nn.Linear or m.weight.dtype != torch.bfloat16 or m.weight.device.type != "cpu":
            continue
        if not hasattr(m, _PACKED):
            weight = pack_weight(m.weight, batch_hint)
            setattr(m, _PACKED, weight)
            m.forward = _PackedForward(m, weight)
            nbytes += m.weight.numel() * m.weight.element_size()
        packed += 1
    return packed, nbytes
