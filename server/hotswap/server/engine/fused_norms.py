"""RMSNorm in one native kernel pass (kernels.rms_norm) in bf16 / fp16 on CPU.

transformers' RMSNorm modules run eight eager ops per call (to fp32, pow, mean, add,
rsqrt, mul, back, times the weight), each a pass over the rows with its own
temporaries: 61 calls a step on the default model, about 1.5 times the kernel's time
at 64 rows and 7 times or more at 2,048 (`bench/token_counts.py`, bench/RESULTS.md). Which modules are RMSNorms is judged by what
they do, not by class name: a leaf module with a 1-D weight, no bias and an epsilon
whose forward gives the kernel's result on random rows (nearly every output bit-equal,
the rest within one rounding step: only the order of the mean's fp32 sum differs),
rounding before the weight (Llama and most) or after it. A norm that computes anything
else (Gemma's 1 + weight, a LayerNorm) keeps its own forward.

The fp32 path — the fidelity reference — is never fused, nor the torch backend; a
module keeps its own forward under autograd (a caller training on the same model).
"""
from __future__ import annotations

import torch
from torch import nn

from . import kernels

_FUSED = "_hotswap_fused_norm"
VERIFY_ROWS = 16
MIN_EXACT = 0.999
"""Fraction of the verification outputs that must equal the module's own bit for bit."""
ROUNDING = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
"""One rounding step relative to a value: the most any other output may differ at verification.
In Llama's order a differently rounded intermediate, times the weight, can reach two steps, so a
genuine RMSNorm can rarely fail this on some weights: it then keeps its own forward (slower, never wrong)."""


class _NormForward:
    """Replaces one RMSNorm's forward: x [..., D] -> [..., D] in x's dtype."""

    def __init__(self, module: nn.Module, eps: float, weight_first: bool, own) -> None:
        self.module, self.eps, self.weight_first, self.own = module, eps, weight_first, own

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight = self.module.weight
        if args or kwargs or x.dtype != weight.dtype or x.device.type != "cpu" or torch.is_grad_enabled() or x.stride(-1) != 1:
            return self.own(x, *args, **kwargs)
        return kernels.rms_norm(x, weight, self.eps, self.weight_first, backend="native")


def _epsilon(m: nn.Module) -> float | None:
    """The epsilon of a module shaped like an RMSNorm (a leaf with a 1-D weight, no bias), else None."""
    weight = getattr(m, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or getattr(m, "bias", None) is not None \
            or next(m.children(), None) is not None:
        return None
    for name in ("variance_epsilon", "eps", "epsilon"):
        eps = getattr(m, name, None)
        if isinstance(eps, float):
            return eps
    return None


def _behaves_as(m: nn.Module, eps: float) -> bool | None:
    """weight_first for which the kernel reproduces m's forward on random rows; None if neither does."""
    w = m.weight
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(VERIFY_ROWS, w.shape[0], generator=gen) * 2).to(w.dtype)
    try:
        own = m(x)
    except Exception:  # noqa: BLE001 - a module that cannot take plain rows is not one we replace
        return None
    if not isinstance(own, torch.Tensor) or own.shape != x.shape or own.dtype != x.dtype:
        return None
    step = ROUNDING[w.dtype]
    for weight_first in (False, True):
        out = kernels.rms_norm(x, w, eps, weight_first, backend="native")
        exact = (out == own).float().mean().item()
        near = bool(((out.float() - own.float()).abs() <= own.float().abs() * step + 1e-6).all())
        if exact >= MIN_EXACT and near:
            return weight_first
    return None


@torch.no_grad()
def fuse_norms(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Route every RMSNorm of a bf16 / fp16 CPU model through the native kernel (once: a model
    shared by several engines is fused by the first); returns how many norms run fused."""
    if device.type != "cpu" or dtype not in ROUNDING or not kernels.native_available():
        return 0
    fused = 0
    for m in model.modules():
        if not hasattr(m, _FUSED):
            eps = _epsilon(m)
            mode = None if eps is None or m.weight.dtype != dtype else _behaves_as(m, eps)
            setattr(m, _FUSED, mode is not None)
            if mode is not None:
                m.forward = _NormForward(m, eps, mode, m.forward)
        fused += getattr(m, _FUSED)
    return fused
