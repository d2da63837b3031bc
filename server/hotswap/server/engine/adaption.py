"""LLaMA-Adapter rows in the packed forward: in each adapted layer, every token of such a
row also attends to its adapter's prompt keys/values, in a softmax of their own, scaled by
the layer's gate, added to the attention output (before o_proj, which is linear and, for
the architectures served, has no bias — see adapters/adaption.py).

The prompt keys/values are the layer's own k_proj / v_proj of the prompt (no rotary); they
are computed at the start of the step, once per distinct adapter in the batch."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.weights import AdaptionWeights


@dataclass
class AdaptionGroup:
    """The tokens of the step's rows that share one adaption-prompt adapter."""

    tokens: torch.Tensor
    """[n] int64 packed token indices."""
    keys: dict[int, torch.Tensor]
    """layer -> [adapter_len, kv_heads, head_dim]."""
    values: dict[int, torch.Tensor]
    gates: dict[int, torch.Tensor]
    """layer -> 0-dim gate."""


def prompt_kv(model: nn.Module, w: AdaptionWeights, kv_heads: int, head_dim: int) -> tuple[dict, dict, dict]:
    """Per adapted layer, the prompt's keys and values [adapter_len, kv_heads, head_dim] and its gate.
    Called while no LoRA step is set, so the projections are the base's own."""
    keys, values, gates = {}, {}, {}
    for i, (path, layer) in enumerate(zip(w.attention, w.layers)):
        attn = model.get_submodule(path)
        p = w.prompts[i][None]  # [1, adapter_len, hidden]
        keys[layer] = attn.k_proj(p)[0].view(-1, kv_heads, head_dim)
        values[layer] = attn.v_proj(p)[0].view(-1, kv_heads, head_dim)
        gates[layer] = w.gates[i]
    return keys, values, gates


def adaption_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """q [n, heads, head_dim]; k, v [adapter_len, kv_heads, head_dim] → gate · softmax(q kᵀ / √d) v, [n, heads, head_dim].
    PEFT scales by 1/√head_dim and takes the softmax in fp32; query head h reads kv head h // (heads / kv_heads)."""
    n, heads, d = q.shape
    group = heads // k.shape[1]
    kk = k.float().repeat_interleave(group, dim=1)  # [L, heads, d]
    vv = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->nhl", q.float(), kk) / math.sqrt(d)
    probs = gate.float() * torch.softmax(scores, dim=-1)
    return torch.einsum("nhl,lhd->nhd", probs, vv).to(q.dtype)
