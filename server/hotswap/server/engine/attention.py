"""Attention over the paged KV cache, registered with transformers' AttentionInterface
so every architecture that routes attention through it runs unchanged.

The model sees one packed sequence of all rows' new tokens ([1, num_tokens]).
Each layer writes its new keys/values into the cache slots the scheduler gave
them, then every query token attends to its own row's positions 0..p (or the
sliding window) read straight from the row's blocks, in one paged-attention call
for the whole batch. A long prompt chunk may go through SDPA over its row's
gathered blocks instead, where a dense kernel's matrix products win: always on the
torch path, and on the native path from the chunk lengths `dense_rule` measures at
load on this machine, one for each of a few context lengths (the longer the context
before a chunk, the shorter the chunk from which SDPA wins: at 1,000 earlier keys
from 16 tokens, at 256 from 16-32; on AVX-512 without AMX the native kernel won at
every length; with AMX, torch's SDPA halves a 4,000-token prefill)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from . import kernels
from .adaption import AdaptionGroup, adaption_attention
from .kv_cache import PagedKVCache

ATTENTION_NAME = "hotswap_paged"
BATCH_KWARG = "hotswap_attention"
DENSE_MIN_TOKENS = 32
"""On the torch path, chunks of at least this many query tokens use SDPA over gathered blocks."""
DENSE_CANDIDATES = (8, 16, 32, 64, 128, 256, 512)
"""Chunk lengths `dense_rule` times, shortest first, at each of DENSE_CONTEXTS."""
DENSE_CONTEXTS = (256, 1024, 4096)
"""Keys before the chunk at which `dense_rule` measures."""


@dataclass(frozen=True)
class DenseRule:
    """Which prompt chunks attend through SDPA over gathered blocks: those of at least min_tokens[i]
    tokens, i the last of `contexts` at or below the chunk's start (the first one below contexts[0]);
    None: never at that context."""

    contexts: tuple[int, ...]
    min_tokens: tuple[int | None, ...]

    def takes(self, start: int, num_tokens: int) -> bool:
        i = 0
        while i + 1 < len(self.contexts) and self.contexts[i + 1] <= start:
            i += 1
        need = self.min_tokens[i]
        return need is not None and num_tokens >= need


@dataclass
class DenseChunk:
    row: int
    """Index into block_tables."""
    q_start: int
    """First of the chunk's tokens in the packed batch."""
    num_tokens: int
    start: int
    """Position of the chunk's first token; it attends to positions 0..start+num_tokens-1."""


@dataclass
class AttentionBatch:
    """One forward's view of the paged cache; tensors on the model's device."""

    cache: PagedKVCache
    slots: torch.Tensor
    """[num_tokens] int64: cache slot each new token's key/value is written to."""
    block_tables: torch.Tensor
    """[rows, max_blocks] int32."""
    token_rows: torch.Tensor
    """[num_tokens] int32: each token's row for the paged kernel; -1 for tokens of dense chunks."""
    token_positions: torch.Tensor
    """[num_tokens] int32."""
    dense: list[DenseChunk]
    paged_tokens: int
    """Tokens attended by the paged kernel (all but the dense chunks')."""
    backend: str
    """"native", "triton" or "torch" (kernels.set_backend names)."""
    adaption: list[AdaptionGroup] = field(default_factory=list)
    """Tokens of LLaMA-Adapter rows, by adapter: they also attend to its gated prompt."""


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            sliding_window: int | None = None, softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (1, heads, num_tokens, head_dim); key/value (1, kv_heads, num_tokens, head_dim) →
    (1, num_tokens, heads, head_dim), the layout transformers' other attention functions return.

    The per-layer kwargs transformers passes are honoured: `scaling` (e.g. Gemma's
    query_pre_attn_scalar), `sliding_window` (None on a global layer of an alternating model),
    `softcap` (Gemma 2's attention logit soft-capping) and `s_aux` (GPT-OSS's attention sinks)."""
    batch = kwargs[BATCH_KWARG]
    if not isinstance(batch, AttentionBatch):  # the load-time probe (engine/architecture.py) only records the call
        return batch(module, query, key, value, sliding_window=sliding_window, softcap=softcap, **kwargs)
    layer = module.layer_idx
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    window = int(window or 0)
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    batch.cache.write(layer, key[0].transpose(0, 1), value[0].transpose(0, 1), batch.slots)
    q = query[0].transpose(0, 1).contiguous()  # [num_tokens, heads, head_dim]
    out = torch.empty_like(q)
    k_cache, v_cache = batch.cache.layer(layer)
    sinks = kwargs.get("s_aux")
    if softcap or sinks is not None:
        # SDPA neither caps logits nor adds sinks: every token of this layer goes through the paged
        # kernel (each path has both), the dense chunks' tokens under their own rows.
        rows = batch.token_rows.clone()
        for chunk in batch.dense:
            rows[chunk.q_start: chunk.q_start + chunk.num_tokens] = chunk.row
        kernels.paged_attention(out, q, k_cache, v_cache, batch.block_tables, rows, batch.token_positions,
                                scale, window, float(softcap or 0.0), sinks, backend=batch.backend)
        return out[None], None
    if batch.paged_tokens:
        kernels.paged_attention(out, q, k_cache, v_cache, batch.block_tables, batch.token_rows, batch.token_positions,
                                scale, window, backend=batch.backend)
    for chunk in batch.dense:
        end = chunk.q_start + chunk.num_tokens
        out[chunk.q_start:end] = dense_chunk_attention(q[chunk.q_start:end], k_cache, v_cache,
                                                       batch.block_tables[chunk.row], chunk.start, scale, window)
    for g in batch.adaption:
        if layer in g.keys:
            out[g.tokens] += adaption_attention(q[g.tokens], g.keys[layer], g.values[layer], g.gates[layer])
    return out[None], None


def dense_chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                          start: int, scale: float, window: int) -> torch.Tensor:
    """q [n, heads, head_dim] at positions start..start+n-1 of one row → [n, heads, head_dim]."""
    n, bs = q.shape[0], k_cache.shape[1]
    end = start + n
    lo = max(0, start - window + 1) if window else 0  # the first key any of these queries sees
    blocks = block_table[lo // bs: -(-end // bs)].long()
    first = lo % bs
    k = k_cache[blocks].flatten(0, 1)[first: first + end - lo]  # [keys, kv_heads, head_dim]
    v = v_cache[blocks].flatten(0, 1)[first: first + end - lo]
    if _CPU_FLASH is not None and q.device.type == "cpu" and start > 0 and not window \
            and (n >= SPLIT_MIN_TOKENS or start >= SPLIT_MIN_CONTEXT):
        return _earlier_then_causal(q, k, v, start, scale)
    # A chunk that starts its row is plain causal attention: SDPA's fused causal kernel, no mask.
    causal = lo == 0 and start == 0 and not window
    mask = None
    if not causal:
        q_pos = torch.arange(start, end, device=q.device)[:, None]
        k_pos = torch.arange(lo, end, device=q.device)[None, :]
        mask = k_pos <= q_pos  # [n, keys]
        if window:
            mask &= k_pos > q_pos - window
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, is_causal=causal, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o[0].transpose(0, 1)


SPLIT_MIN_TOKENS = 512
"""Continued chunks of at least this many tokens take `_earlier_then_causal` on CPU. Below it (and below
SPLIT_MIN_CONTEXT) one masked pass was about as fast (bf16, the default model's heads, by hand: 32-256 tokens
after 1,024 keys within 10% either way; 1,952 after 2,048 took 29 ms split against 45 masked), and the
split's extra rounding buys nothing."""
SPLIT_MIN_CONTEXT = 2048
"""Continued chunks of any length after at least this many keys take `_earlier_then_causal` on CPU too: with
the query heads of a kv head stacked, its unmasked pass reads each earlier key once where one masked pass
reads the whole rectangle (bf16, the default model's heads, by hand: 8-256 tokens after 2,048 keys 10-18%
less, after 3,000 13-20%; after 1,536 it lost for some lengths, after 1,024 and 256 for most)."""
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
"""SDPA's CPU flash kernel, called directly for the log-sum-exp it returns (F.scaled_dot_product_attention drops it)."""


def _earlier_then_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """A chunk continuing its row (q [n, heads, head_dim] at positions start..start+n-1; k, v [start + n,
    kv_heads, head_dim]) as two flash passes merged by their log-sum-exps: every query sees all `start`
    earlier keys (no mask), and the chunk's own keys causally (a square, so the fused causal kernel).
    One masked pass over the [n, start + n] rectangle took ~1.5x as long on CPU: SDPA's flash kernel
    reads the mask tile by tile and skips nothing. In bf16 each pass rounds its output before the
    merge: about one more half-ulp of error than one pass."""
    n, heads, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    # Earlier keys, unmasked: each kv head's query heads stacked along the sequence (their order does
    # not matter without a mask), so no key is repeated for GQA and each is read once per kv head.
    qf = q.view(n, kv_heads, group, d).permute(1, 2, 0, 3).reshape(1, kv_heads, group * n, d)
    o1, lse1 = _CPU_FLASH(qf, k[:start].transpose(0, 1)[None], v[:start].transpose(0, 1)[None], 0.0, False, scale=scale)
    o1, lse1 = o1.reshape(1, heads, n, d), lse1.reshape(1, heads, n)  # [1, heads, n, d], [1, heads, n]
    # The chunk's own keys, causally: the flash op takes no enable_gqa, so these (only these) are repeated.
    kh, vh = (x[start:].transpose(0, 1)[None].repeat_interleave(group, 1) for x in (k, v))
    o2, lse2 = _CPU_FLASH(q.transpose(0, 1)[None], kh, vh, 0.0, True, scale=scale)
    # softmax over both key sets = the passes' outputs weighted by their exp(lse) shares
    earlier = torch.sigmoid(lse1 - lse2)[..., None]  # [1, heads, n, 1] float32: exp(lse1) / (exp(lse1) + exp(lse2))
    o = torch.lerp(o2.float(), o1.float(), earlier)
    return o[0].transpose(0, 1).to(q.dtype)


@lru_cache(maxsize=16)
@torch.inference_mode()
def dense_rule(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
               block_size: int, reps: int = 3) -> DenseRule | None:
    """At each of DENSE_CONTEXTS, the shortest chunk (of DENSE_CANDIDATES) for which SDPA over gathered
    blocks beats the native paged kernel here, timed on random data in the model's geometry (once per
    geometry and process); None when it never does. A longer context never needs a longer chunk than a
    shorter one did (the dense pass's fixed cost shrinks relative to the keys both read)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    ctx_max = DENSE_CONTEXTS[-1] + DENSE_CANDIDATES[-1]
    blocks = -(-ctx_max // block_size)
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    table = torch.arange(blocks, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def shortest(ctx: int, below: int | None) -> int | None:
        for n in DENSE_CANDIDATES:
            if below is not None and n >= below:
                return below
            q = torch.randn(n, heads, head_dim, generator=gen).to(device, dtype)
            out = torch.empty_like(q)
            rows = torch.zeros(n, dtype=torch.int32, device=device)
            positions = torch.arange(ctx, ctx + n, dtype=torch.int32, device=device)
            native = best(lambda: kernels.paged_attention(out, q, k_cache, v_cache, table[None], rows, positions, scale, 0,
                                                          backend="native"))
            dense = best(lambda: dense_chunk_attention(q, k_cache, v_cache, table, ctx, scale, 0))
            if dense < native:
                return n
        return below

    found: list[int | None] = []
    for ctx in DENSE_CONTEXTS:
        found.append(shortest(ctx, found[-1] if found else None))
    return DenseRule(DENSE_CONTEXTS, tuple(found)) if any(n is not None for n in found) else None


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
