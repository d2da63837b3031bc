"""A weighted combination of LoRA adapters for one request: ΔW = Σ w_i · s_i · B_i A_i.

This is exactly PEFT's `add_weighted_adapter(..., combination_type="cat")`: the ranks are
concatenated, A_i scaled by w_i · s_i, the result's scale 1 (its lora_alpha = its rank).
It is the one combination that is exact per token: PEFT's "linear" merges A's and B's
separately, and Σ √w_i A_i × Σ √w_j B_j mixes cross terms of different adapters.
Only plain low-rank adapters combine: a DoRA magnitude, IA3 vector or embedding / head table
is not linear in its weight, PEFT's combination leaves lora_B biases out and refuses target_parameters."""
from __future__ import annotations

import torch

from ..errors import AdapterIncompatible
from .weights import Adapter, LoraModuleWeights, LoraWeights


def combine(parts: list[tuple[Adapter, float]], combined_id: str, max_rank: int) -> Adapter:
    """parts: (device adapter, weight) in request order → one LORA adapter (modules = union of targets).
    The combined rank (Σ rᵢ per module) is held to `max_rank`, like any adapter: the LoRA slots'
    rank axis grows to the largest rank ever loaded and never shrinks."""
    for adapter, _ in parts:
        if not isinstance(adapter.weights, LoraWeights) or not adapter.weights.plain:
            kind = adapter.peft_type if not isinstance(adapter.weights, LoraWeights) else \
                "a LoRA with DoRA, lora_bias, IA3 vectors, embedding / head tables or target_parameters"
            raise AdapterIncompatible(f"adapter {adapter.id!r} is {kind}: only plain LoRA / AdaLoRA adapters can be combined",
                                      field="adapters")
    names = sorted({name for adapter, _ in parts for name in adapter.weights.modules})
    modules = {}
    for name in names:
        pieces = [(adapter.weights.modules[name], w) for adapter, w in parts if name in adapter.weights.modules]
        a = torch.cat([m.a * (w * m.scale) for m, w in pieces], dim=0)  # [Σ r_i, in]
        b = torch.cat([m.b for m, _ in pieces], dim=1)  # [out, Σ r_i]
        if a.shape[0] > max_rank:
            raise AdapterIncompatible(f"the combination has rank {a.shape[0]} on {name!r} (the sum of its adapters' ranks), above the "
                                      f"configured maximum {max_rank} (max_lora_rank)", field="adapters")
        modules[name] = LoraModuleWeights(a, b, 1.0)
    return Adapter(combined_id, "LORA", LoraWeights(modules), {"combination_type": "cat", "adapters": [a.id for a, _ in parts]})
