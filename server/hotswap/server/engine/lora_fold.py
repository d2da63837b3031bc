"""What one adapter module puts into its slot: B with every per-output factor folded in, and
the per-output multiplier and shift its slot applies to the base output (DoRA, lora_bias, IA3,
a trained base bias).

DoRA (peft/tuners/lora/dora.py) returns base + (g - 1)(base - bias) + g·s·B A x with
g = m / ||W + s B A||_row, the norm detached and taken over the dequantized base weight.
Rewritten as  g·base + bias·(1 - g) + (g·s·B) A x  it is a per-output multiplier, a per-output
shift and an ordinary LoRA delta, so it rides the same per-token slot gathers as everything
else; g and the shift depend only on the adapter and the base, so they are computed once here."""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters.weights import LoraModuleWeights


def dense_weight(linear: nn.Linear) -> torch.Tensor:
    """[out, in] the linear's weight as plain numbers, bitsandbytes 4/8-bit weights dequantized
    without touching the module (PEFT's dequantize_module_weight re-assigns an int8 weight, which
    drops its scales once the layer has run)."""
    w = linear.weight
    if isinstance(linear, Conv1D):  # GPT-2's Conv1D keeps its weight as [in, out] (y = x W + b)
        return w.detach().T
    kind = type(w).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    if kind == "Int8Params":  # int8 rows times their absmax / 127 (bitsandbytes' vector-wise quantization)
        state = getattr(linear, "state", None)
        scb = getattr(state, "SCB", None) if state is not None else None
        scb = scb if scb is not None else w.SCB
        return w.data.float() * (scb.float()[:, None] / 127)
    return w.detach()


def fold(m: LoraModuleWeights, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(B^T [r, out] with scale and DoRA's g folded in, multiplier [out] or None, shift [out] or None), fp32."""
    b = m.b.float() * m.scale  # [out, r]
    mult = shift = None
    base_bias = None if linear.bias is None else linear.bias.detach().float().to(b.device)
    bias = m.base_bias.float().to(b.device) if m.base_bias is not None else base_bias  # the bias PEFT's forward adds
    if m.magnitude is not None:
        w = dense_weight(linear).float().to(b.device)  # [out, in]
        norm = torch.linalg.norm(w + m.scale * (m.b.float() @ m.a.float()), dim=1)  # [out]
        mult = m.magnitude.float() / norm
        b = b * mult[:, None]
        if bias is not None:  # DoRA scales the base output without its bias
            shift = bias * (1 - mult)
    if m.out_scale is not None:  # IA3 scales the whole output, bias included
        mult = m.out_scale.float() if mult is None else mult * m.out_scale.float()
    if m.bias is not None:  # lora_B's bias goes through the same scaling as B A x
        extra = m.bias.float() * m.scale * (1 if mult is None else mult)
        shift = extra if shift is None else shift + extra
    if m.base_bias is not None:  # the hook scales the base output, its bias included: swap base's bias for the adapter's
        # under that multiplier (DoRA's g(W x + b) + b'(1 - g) + g(b' - b) = g W x + b')
        extra = (bias - (base_bias if base_bias is not None else 0.0)) * (1 if mult is None else mult)
        shift = extra if shift is None else shift + extra
    return b.T, mult, shift
