"""Sampling functions against transformers' own logits processors, per row."""
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hotswap.server.engine.sampling import apply_repetition_penalty, apply_top_k, apply_top_p, process_and_sample


def _logits(rows=4, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_transformers_per_row():
    logits = _logits()
    seqs = [[1, 2, 3], [4], [5, 5, 6, 7], [8, 9]]
    penalties = [1.3, 1.0, 0.7, 2.0]
    width = max(map(len, seqs))
    seen = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros(4, width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        seen[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    ours = apply_repetition_penalty(logits, seen, mask, torch.tensor(penalties))
    for i, (s, p) in enumerate(zip(seqs, penalties)):
        theirs = RepetitionPenaltyLogitsProcessor(p)(torch.tensor([s]), logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i], theirs[0])


def test_top_k_and_top_p_match_transformers_per_row():
    logits = _logits()
    ks, ps = [0, 1, 5, 49], [1.0, 0.5, 0.9, 0.2]
    ours_k = apply_top_k(logits, torch.tensor(ks))
    ours_p = apply_top_p(logits, torch.tensor(ps))
    for i in range(4):
        theirs_k = TopKLogitsWarper(ks[i])(None, logits[i : i + 1].clone()) if ks[i] else logits[i : i + 1]
        theirs_p = TopPLogitsWarper(ps[i])(None, logits[i : i + 1].clone()) if ps[i] < 1 else logits[i : i + 1]
        assert torch.equal(torch.isinf(ours_k[i]), torch.isinf(theirs_k[0]))
        assert torch.equal(torch.isinf(ours_p[i]), torch.isinf(theirs_p[0]))


def test_greedy_rows_take_argmax_and_top_k_1_is_greedy():
    logits = _logits(rows=3)
    gens = [None, torch.Generator().manual_seed(1), None]
    out = process_and_sample(logits, torch.tensor([0.0, 1.5, 0.0]), torch.tensor([0, 1, 0]), torch.ones(3), gens)
    assert out.tolist() == logits.argmax(-1).tolist()


def test_seeded_row_is_reproducible_whatever_its_batch_mates():
    logits = _logits(rows=6, vocab=1000)
    alone = process_and_sample(
        logits[2:3], torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1.0]), [torch.Generator().manual_seed(42)]
    )
    draws = []
    for mates_seed in (1, 2):
        gens = [torch.Generator().manual_seed(mates_seed + i) for i in range(6)]
        gens[2] = torch.Generator().manual_seed(42)
        temps = torch.tensor([0.7, 0.0, 1.0, 1.2, 0.0, 2.0])
        draws.append(process_and_sample(logits, temps, torch.zeros(6, dtype=torch.long), torch.ones(6), gens)[2].item())
    assert draws[0] == draws[1] == alone.item()


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(2000):
        counts[process_and_sample(logits, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1.0]), [gen])] += 1
    assert torch.allclose(counts / 2000, torch.tensor([0.7, 0.2, 0.1]), atol=0.04)


def test_filters_that_are_off_are_skipped_without_changing_a_draw():
    """top_k / top_p None (every row has them off) skips the sorts and draws exactly as top_k 0 / top_p 1."""
    logits = _logits(rows=4, vocab=5000)
    logits[1, :4000] = -200.0  # probabilities that underflow to 0 must stay out of the draw either way
    temps = torch.tensor([0.7, 1.0, 1.3, 2.0])
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed * 4 + i) for i in range(4)]
        filtered = process_and_sample(logits, temps, torch.zeros(4, dtype=torch.long), torch.ones(4), gens)
        gens = [torch.Generator().manual_seed(seed * 4 + i) for i in range(4)]
        assert torch.equal(process_and_sample(logits, temps, None, None, gens), filtered)
