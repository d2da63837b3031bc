"""Per-row sampling as small pure functions over a [B, V] logits tensor.

Each row carries its own parameters and its own torch.Generator, so a seeded
request draws the same tokens whatever its batch mates are (gpt-fast style:
no host round-trips inside; the caller syncs once per step)."""
from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, seen_mask: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, per row.

    logits [B, V]; seen [B, T] token ids (padded); seen_mask [B, T] bool; penalty [B].
    """
    scores = logits.gather(1, seen)  # [B, T]
    p = penalty[:, None]
    scores = torch.where(scores < 0, scores * p, scores / p)
    # Padding entries write back the logit they read, so they change nothing.
    scores = torch.where(seen_mask, scores, logits.gather(1, seen))
    return logits.scatter(1, seen, scores)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """top_k [B], 0 = off."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(1, (k - 1)[:, None])  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering, transformers' TopPLogitsWarper semantics; top_p [B], 1 = off."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)[:, None]
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_rows(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One multinomial draw per row with that row's generator. probs [B, V] -> [B]."""
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def process_and_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """logits [B, V] (penalties already applied) -> next token ids [B].

    Rows with temperature 0 are greedy; the others are scaled, filtered and sampled.
    """
    greedy = logits.argmax(dim=-1)
    stochastic = temperature > 0
    if not bool(stochastic.any()):
        return greedy
    idx = stochastic.nonzero().squeeze(1)
    sub = logits.index_select(0, idx).float() / temperature.index_select(0, idx)[:, None]
    sub = apply_top_k(sub, top_k.index_select(0, idx))
    sub = apply_top_p(sub, top_p.index_select(0, idx))
    drawn = sample_rows(sub.softmax(dim=-1), [generators[i] for i in idx.tolist()])
    return greedy.index_put((idx,), drawn)
