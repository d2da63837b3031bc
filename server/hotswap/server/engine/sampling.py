"""Sampling for all rows in one pass over a [rows, vocab] logits tensor, as small
pure functions with no host round-trip inside (gpt-fast style): the caller copies
the step's results to the host once.

A draw is the exponential race: argmax(p / E) with E ~ Exp(1) per token, which
picks token i with probability p_i. Rows with a seed draw E from their own
generator, so a seeded request gets the same tokens whatever its batch mates;
the other rows share one engine-owned generator. The process-wide RNG is never
touched."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels


GREEDY_BELOW = 1e-5
"""Rows with a temperature below this are decoded greedily: the distribution is its argmax to
within float32 anyway, and logits / t overflow for a t near float32's smallest (1e-40 drew
token 0 every time, whatever the logits)."""


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


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None], shared: torch.Generator | None) -> torch.Tensor:
    """One draw per row: probs [B, V] -> [B]. Row i's noise comes from generators[i], or `shared` when None."""
    noise = torch.empty_like(probs)
    own = [i for i, g in enumerate(generators) if g is not None]
    others = [i for i, g in enumerate(generators) if g is None]
    for i in own:
        noise[i].exponential_(generator=generators[i])
    if others:
        if len(others) == len(generators):
            noise.exponential_(generator=shared)
        else:
            idx = torch.tensor(others, device=probs.device)
            noise[idx] = torch.empty(len(others), probs.shape[1], device=probs.device, dtype=probs.dtype).exponential_(generator=shared)
    return (probs / noise).argmax(dim=-1)


def process_and_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    generators: list[torch.Generator | None],
    stochastic: list[int] | None = None,
    shared: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] (penalties already applied) -> next token ids [B].

    Rows with temperature below GREEDY_BELOW are greedy; the others (`stochastic`, their indices, read from
    `temperature` when not given) are scaled, filtered and drawn. `top_k` / `top_p` None:
    no row filters that way (skips a [B, V] sort and its transient memory)."""
    greedy = logits.argmax(dim=-1)
    if stochastic is None:
        stochastic = (temperature >= GREEDY_BELOW).nonzero().squeeze(1).tolist()
    if not stochastic:
        return greedy
    if shared is None and any(generators[i] is None for i in stochastic):
        shared = torch.Generator(device=logits.device)
        shared.seed()
    idx = torch.tensor(stochastic, device=logits.device)
    sub = logits.index_select(0, idx).float() / temperature.index_select(0, idx)[:, None]
    if top_k is not None:
        sub = apply_top_k(sub, top_k.index_select(0, idx))
    if top_p is not None:
        sub = apply_top_p(sub, top_p.index_select(0, idx))
    drawn = exponential_race(sub.softmax(dim=-1), [generators[i] for i in stochastic], shared)
    return greedy.index_put((idx,), drawn)


@dataclass
class SampledStep:
    """One step's results, copied to the host in a single transfer."""

    tokens: list[int]
    logprobs: list[float] | None
    """Log-probability of each sampled token (under the raw logits), when any row asked."""
    top: list[list[tuple[int, float]]] | None
    """The k_max most likely (token, logprob) per row, best first, when any row asked for alternatives."""
    finite: list[bool]
    """False where the row's logits held NaN or inf (the row fails alone)."""


def sample_step(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                generators: list[torch.Generator | None], shared: torch.Generator, want_logprobs: bool, k_max: int,
                penalized: torch.Tensor | None = None, backend: str | None = None) -> SampledStep:
    """logits [B, V] raw, in the head's dtype (widened to fp32 only where rows sample or want
    log-probs); `penalized` the same after repetition penalties, fp32 (or None); `backend`: the
    kernels' (kernels.row_max takes the greedy maximum natively on CPU).

    Every full pass over [B, V] costs as much as a small layer on CPU, so greedy rows
    take one: the row maximum gives both the token and the health check (a NaN or +inf
    maximum means the row's forward broke). Only rows that sample or want log-probs
    pay for more."""
    dev = logits.device
    scores = logits if penalized is None else penalized
    best, tokens = kernels.row_max(scores, backend=backend)  # [B]
    finite = torch.isfinite(best) & (torch.isfinite(kernels.row_max(logits, backend=backend)[0]) if penalized is not None else True)
    stochastic = [i for i, t in enumerate(temperature) if t >= GREEDY_BELOW]
    if stochastic:
        idx = torch.tensor(stochastic, device=dev)
        sub = torch.nan_to_num(scores.index_select(0, idx).float())
        # clamped on the host: a k past int64 (the HTTP API takes any integer) would fail the tensor,
        # and with it the whole step, every row of the batch
        ks, ps = [min(top_k[i], logits.shape[-1]) for i in stochastic], [top_p[i] for i in stochastic]
        drawn = process_and_sample(sub, torch.tensor([temperature[i] for i in stochastic], device=dev),
                                   torch.tensor(ks, device=dev) if any(k > 0 for k in ks) else None,
                                   torch.tensor(ps, device=dev) if any(p < 1 for p in ps) else None,
                                   [generators[i] for i in stochastic], list(range(len(stochastic))), shared)
        tokens = tokens.index_put((idx,), drawn)
    cols = [tokens.double()[:, None], finite.double()[:, None]]
    if want_logprobs:
        logp = torch.log_softmax(torch.nan_to_num(logits.float()), dim=-1)
        cols.append(logp.gather(1, tokens[:, None]).double())
        if k_max:
            top = logp.topk(k_max, dim=-1)
            cols += [top.indices.double(), top.values.double()]
    host = torch.cat(cols, dim=1).tolist()  # the step's one device -> host copy
    return SampledStep(
        tokens=[int(r[0]) for r in host],
        logprobs=[r[2] for r in host] if want_logprobs else None,
        top=[list(zip(map(int, r[3: 3 + k_max]), r[3 + k_max:])) for r in host] if want_logprobs and k_max else None,
        finite=[r[1] > 0 for r in host],
    )
