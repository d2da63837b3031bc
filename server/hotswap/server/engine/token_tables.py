"""Per-row input embeddings and output heads of adapters with `TokenTables` (modules_to_save
copies of the embedding / head, LoRA on the embedding, trainable tokens).

Only rows whose adapter has tables pay anything; the head is recomputed once per distinct
table in the step, for that table's sampling rows only."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapters.weights import TokenTables


def embed_rows(t: TokenTables, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """ids [n] token ids (>= 0), rows [n, hidden] the base's embeddings of them → the adapter's, PEFT's order:
    own table, then replaced token rows (index_copy on the table), then + scale · B A[:, id]."""
    out = rows if t.embed is None else F.embedding(ids, t.embed).to(rows.dtype)
    if t.token_ids is not None:  # token_ids sorted at load: a binary search per token, no [n, k] comparison
        at = torch.searchsorted(t.token_ids, ids).clamp(max=len(t.token_ids) - 1)  # [n]
        found = t.token_ids[at] == ids
        out = torch.where(found[:, None], t.token_rows[at].to(out.dtype), out)
    if t.embed_a is not None:
        delta = F.embedding(ids, t.embed_a.T) @ t.embed_b.T  # [n, hidden]
        out = out + (delta * t.embed_scale).to(out.dtype)
    return out


def head_logits(t: TokenTables, hidden: torch.Tensor, logits: torch.Tensor, head_bias: torch.Tensor | None) -> torch.Tensor:
    """hidden [n, hidden] and the base head's logits [n, vocab] of rows sharing `t` → theirs."""
    if t.head is not None:
        logits = F.linear(hidden, t.head.to(hidden.dtype), head_bias)
    if t.head_ids is not None:
        cols = F.linear(hidden, t.head_rows.to(hidden.dtype), None if head_bias is None else head_bias[t.head_ids])  # [n, j]
        logits = logits.index_copy(1, t.head_ids, cols.to(logits.dtype))
    return logits
