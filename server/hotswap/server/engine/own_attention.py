"""The forward for architectures whose attention does not go through transformers'
AttentionInterface (BLOOM's ALiBi, Falcon, GPT-J, MPT ...; engine/architecture.py decides).

Each scheduled row runs alone through the model's own attention: its past keys/values
(positions 0..start-1, prefix-tuning virtual tokens and prefix-cache hits included) are
gathered from the paged cache into a transformers DynamicCache, the model attends over
them exactly as in its own generate, and the new keys/values are written back to the
row's slots. The paged cache stays the one store, so the scheduler, prefix caching,
preemption and prefix tuning work unchanged; the cost is one forward per row and a copy
of the row's context per step — slower than the packed path, never a different answer.
LoRA and prompt tuning need nothing special: the per-token LoRA hooks see one row's
tokens (and, in a linear the model runs over the row's past too — Doge's dt_proj, DeepSeek's
kv_b_proj over its latent cache — the row's adapter reaches those rows: LoraStep.one_row),
and prompt-tuning rows arrive as input embeddings."""
from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from .inputs import StepInputs
from .kv_cache import PagedKVCache
from .lora import LoraContext, LoraStep
from .scheduler import ScheduledRow


def _past(cache: PagedKVCache, block_ids: list[int], length: int) -> DynamicCache:
    """A DynamicCache holding the row's first `length` positions of every layer, each [1, kv_heads, length, head_dim]."""
    if length == 0:
        return DynamicCache()
    pos = torch.arange(length)
    slots = (torch.tensor(block_ids)[pos // cache.block_size] * cache.block_size + pos % cache.block_size).to(cache.keys.device)
    flat = (cache.keys.shape[0], -1, *cache.keys.shape[3:])  # [layers, num_blocks * block_size, kv_heads, head_dim]
    keys = cache.keys.view(flat)[:, slots].transpose(1, 2)  # [layers, kv_heads, length, head_dim]
    values = cache.values.view(flat)[:, slots].transpose(1, 2)
    return DynamicCache(ddp_cache_data=[(k[None], v[None]) for k, v in zip(keys, values)])


def forward_rows(decoder: nn.Module, cache: PagedKVCache, scheduled: list[ScheduledRow], step: StepInputs,
                 embeds: torch.Tensor, lora: LoraContext, backend: str) -> torch.Tensor:
    """`decoder` a CausalLM's base model; embeds [num_tokens, hidden] packed as in `step` → the final
    hidden states [num_tokens, hidden] in the same packing (the runner applies the head)."""
    dev = embeds.device
    slots = step.slots.to(dev)
    hidden = []
    for s, q in zip(scheduled, step.first):
        n = s.num_tokens
        past = _past(cache, s.row.block_ids, s.start)
        if step.lora_slots is not None:
            scales = None if step.lora_scales is None else step.lora_scales[q: q + n].to(dev)
            lora.step = LoraStep.of(step.lora_slots[q: q + n].to(dev), scales, lora.slots.max_loras, backend, one_row=True,
                                    host_slots=frozenset([s.row.lora_slot]) if s.row.lora_slot >= 0 else frozenset())
        try:
            out = decoder(inputs_embeds=embeds[None, q: q + n], past_key_values=past, use_cache=True)
        finally:
            lora.step = None
        hidden.append(out.last_hidden_state[0])  # [n, hidden]
        for layer, kv in enumerate(past.layers):  # the new positions' keys/values, [1, kv_heads, n, head_dim] each
            cache.write(layer, kv.keys[0, :, s.start:].transpose(0, 1), kv.values[0, :, s.start:].transpose(0, 1), slots[q: q + n])
    return torch.cat(hidden)
