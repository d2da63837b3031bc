"""Pure-torch versions of the kernels, same signatures: the fallback off CPU (or
without a compiler) and the oracle the native kernels are tested against.

Device-agnostic and vectorised: tokens are processed with gathers, never one
Python iteration per token. Paged attention loops only over rows that carry
several query tokens (prefill chunks); every single-token row (decode) goes
through one batched gather. All math in fp32, results rounded once.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

# Per-token gathers are done in chunks of at most this many gathered elements,
# so a long prefill does not materialise a [tokens, context, heads, dim] copy at once.
_GATHER_BUDGET = 1 << 24


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, rows: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` logical positions of each row, [n, length, KVH, D]. Table entries past a
    row's own length (padding) are clamped into range: those keys are masked anyway."""
    num_blocks, block_size = cache.shape[:2]
    j = torch.arange(length, device=rows.device)
    blocks = block_tables[rows][:, j // block_size].long().clamp(0, num_blocks - 1)  # [n, length]
    return cache[blocks, (j % block_size).expand_as(blocks)]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float,
            softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, H, D]; k/v [n, L, KVH, D] (one row per token) or [L, KVH, D] (shared by all n);
    allowed [n, L]; sinks [H] or None -> [n, H, D] in fp32."""
    n, H, D = q.shape
    KVH = k.shape[-2]
    per_token = k.dim() == 4
    qg = q.float().view(n, KVH, H // KVH, D)  # [n, KVH, G, D]
    scores = torch.einsum("nkgd,nlkd->nkgl" if per_token else "nkgd,lkd->nkgl", qg, k.float()) * scale  # [n, KVH, G, L]
    if softcap > 0:  # Gemma 2: cap the scaled logits before the mask (transformers' eager_attention_forward)
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    if sinks is not None:
        # Attention sinks (GPT-OSS): one extra logit per head joins the softmax, its probability dropped.
        sink = sinks.float().view(1, KVH, H // KVH, 1).expand(n, -1, -1, -1)  # [n, KVH, G, 1]
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    # Masked keys get probability 0, but 0 * (NaN in a never-written cache slot) is NaN.
    if per_token:
        v = torch.where(allowed[:, :, None, None], v.float(), 0.0)  # [n, L, KVH, D]
        return torch.einsum("nkgl,nlkd->nkgd", probs, v).reshape(n, H, D)
    v = torch.where(allowed.any(0)[:, None, None], v.float(), 0.0)  # [L, KVH, D]
    return torch.einsum("nkgl,lkd->nkgd", probs, v).reshape(n, H, D)


def _allowed(positions: torch.Tensor, length: int, sliding_window: int) -> torch.Tensor:
    """[n, length]: key j visible to a query at position p (causal, optional window)."""
    j = torch.arange(length, device=positions.device)
    p = positions[:, None].long()
    ok = j <= p
    if sliding_window > 0:
        ok &= j > p - sliding_window
    return ok


def paged_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    token_rows: torch.Tensor,
    token_positions: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> None:
    N, H, D = query.shape
    KVH = key_cache.shape[2]
    valid = torch.nonzero(token_rows >= 0).flatten()
    if valid.numel() == 0:
        return
    rows = token_rows[valid].long()
    per_row = torch.bincount(rows, minlength=block_tables.shape[0])
    single = per_row[rows] == 1

    # Decode-like tokens (alone in their row): one gather [n, L, KVH, D] for all of them.
    idx = valid[single]
    longest = int(token_positions[idx].max()) + 1 if idx.numel() else 1
    step = max(1, _GATHER_BUDGET // (longest * KVH * D))
    for start in range(0, idx.numel(), step):
        tok = idx[start : start + step]
        pos = token_positions[tok]
        length = int(pos.max()) + 1
        rows_t = token_rows[tok].long()
        k, v = (_gather(c, block_tables, rows_t, length) for c in (key_cache, value_cache))  # [n, L, KVH, D]
        res = _attend(query[tok], k, v, _allowed(pos, length, sliding_window), scale, softcap, sinks)
        out[tok] = res.to(out.dtype)

    # Rows with several query tokens (prefill chunks): the row's keys gathered once.
    for row in torch.unique(rows[~single]).tolist():
        tok = valid[rows == row]
        pos = token_positions[tok]
        length = int(pos.max()) + 1
        row_t = torch.tensor([row], device=tok.device)
        k, v = (_gather(c, block_tables, row_t, length)[0] for c in (key_cache, value_cache))  # [L, KVH, D]
        res = _attend(query[tok], k, v, _allowed(pos, length, sliding_window), scale, softcap, sinks)
        out[tok] = res.to(out.dtype)


def _lora_chunks(n: int, per_token: int) -> Iterator[slice]:
    step = max(1, _GATHER_BUDGET // max(1, per_token))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def lora_shrink(out: torch.Tensor, x: torch.Tensor, a_slots: torch.Tensor, token_slots: torch.Tensor, ranks: torch.Tensor) -> None:
    S, R, IN = a_slots.shape
    for c in _lora_chunks(x.shape[0], R * IN):
        slots = token_slots[c].long()
        a = a_slots[slots.clamp(min=0)].float()  # [n, R, IN]
        res = torch.bmm(a, x[c].float().unsqueeze(-1)).squeeze(-1)  # [n, R]
        keep = (torch.arange(R, device=x.device) < ranks[slots.clamp(min=0)][:, None]) & (slots >= 0)[:, None]
        out[c] = torch.where(keep, res, torch.zeros((), device=x.device))


def lora_expand(y: torch.Tensor, t: torch.Tensor, b_slots: torch.Tensor, token_slots: torch.Tensor, ranks: torch.Tensor) -> None:
    S, R, OUT = b_slots.shape
    for c in _lora_chunks(y.shape[0], OUT * R):
        slots = token_slots[c].long()
        rank = ranks[slots.clamp(min=0)]  # [n]
        in_rank = torch.arange(R, device=y.device) < rank[:, None]  # [n, R]
        # Zero B's rows past the rank too: a slot's unused rows may hold anything.
        b = torch.where(in_rank[:, :, None], b_slots[slots.clamp(min=0)].float(), 0.0)  # [n, R, OUT]
        tt = torch.where(in_rank, t[c], 0.0)
        delta = torch.bmm(tt.unsqueeze(1), b).squeeze(1)  # [n, OUT]
        y[c] = torch.where((slots >= 0)[:, None], (y[c].float() + delta).to(y.dtype), y[c])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_first: bool) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(x.dtype) if weight_first else weight * h.to(x.dtype)



def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = x.max(dim=-1)
    return values.float(), indices


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, T, D], k [B, KVH, T, D], cos / sin [B or 1, T, D]: the eager ops, each rounded to the dtype."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
