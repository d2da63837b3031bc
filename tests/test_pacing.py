"""The prefill pacer's step-cost model, on simulated devices (tensor-free, like the pacer)."""
from __future__ import annotations

import random

import pytest

from hotswap.server.engine.pacing import PrefillPacer, context_sum


def device(fixed: float, per_token: float, per_context: float, noise: float = 0.0, seed: int = 0):
    """A device whose step takes fixed + Σ tokens (per_token + per_context × context), ± noise."""
    rnd = random.Random(seed)

    def step(decoding: list[int], chunks: list[tuple[int, int]]) -> tuple[int, int, float]:
        tokens = len(decoding) + sum(n for _, n in chunks)
        context = sum(decoding) + sum(context_sum(s, n) for s, n in chunks)
        seconds = fixed + per_token * tokens + per_context * context
        return tokens, context, seconds * (1 + rnd.uniform(-noise, noise))
    return step


def feed(pacer: PrefillPacer, step, decoding: list[int], chunks: list[tuple[int, int]]) -> float:
    tokens, context, seconds = step(decoding, chunks)
    pacer.observe(tokens, context, seconds, prompts=bool(chunks))
    return seconds


def test_nothing_measured_moves_one_cautious_chunk():
    pacer = PrefillPacer(limit=2.5, min_tokens=16)
    assert pacer.spare(0, 0) is None and pacer.tokens(None, 0, 300, True) == (300, 0.0)  # nobody decoding: unpaced
    spare = pacer.spare(4, 400)
    assert pacer.tokens(spare, 0, 300, True)[0] == 16 and pacer.tokens(spare, 0, 300, False)[0] == 0
    feed(pacer, device(0.03, 5e-4, 0), [100] * 4, [])  # decode-only steps say nothing of a prompt token's cost
    assert pacer.cost_model() is None and pacer.spare(4, 400) == 0.0


def test_more_rows_waiting_than_decoding_are_not_paced():
    """The limit spares decoding rows while they are at least as many as the rows waiting for a
    first token; past that, prompt work is unpaced (see the module's doc)."""
    pacer = PrefillPacer(limit=2.5, min_tokens=16)
    step = device(0.025, 5e-4, 0)
    feed(pacer, step, [], [(0, 64)])
    feed(pacer, step, [100] * 4, [(0, 32)])
    assert pacer.spare(4, 400, waiting=4) == pytest.approx(1.5 * (0.025 + 4 * 5e-4), rel=1e-6)
    assert pacer.spare(4, 400, waiting=5) is None and pacer.spare(0, 0, waiting=0) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fixed_step_cost_is_told_from_the_per_token_cost(seed: int):
    """A CPU-like device: 25 ms a step whatever its size, 0.5 ms a token. Learnt from the engine's
    warm-up (one short prompt, one decoding row) and a few mixed steps, the pacer must not take a
    step of 30 decoding rows for 30 steps of one (a per-row model did: ~1 s of prompt work where
    ~65 ms were allowed)."""
    step = device(0.025, 5e-4, 2e-7, noise=0.03, seed=seed)
    pacer = PrefillPacer(limit=2.5, min_tokens=16)
    feed(pacer, step, [], [(0, 32)])  # the warm-up: a 32-token prompt, then its one decoding row
    feed(pacer, step, [32], [])
    for rows in (1, 3, 8):  # a few rows decoding long contexts, prompts arriving
        feed(pacer, step, [900] * rows, [(0, 100)])
        feed(pacer, step, [901] * rows, [])
    decoding = [1000 + i for i in range(30)]
    alone = step(decoding, [])[2]
    spare = pacer.spare(len(decoding), sum(decoding))
    n, _ = pacer.tokens(spare, 0, 2048, True)
    with_prompt = step(decoding, [(0, n)])[2]
    assert with_prompt <= 2.5 * alone * 1.1, (n, with_prompt, alone)
    assert with_prompt >= 2.5 * alone * 0.8, (n, with_prompt, alone)  # and not far less: prompts still move
    # one decoding row: the fixed cost is most of its step, so little prompt work fits beside it
    n1, _ = pacer.tokens(pacer.spare(1, 1000), 0, 2048, True)
    assert step([1000], [(0, n1)])[2] <= 2.5 * step([1000], [])[2] * 1.1


def test_decode_only_steps_do_not_wash_out_what_prompts_taught():
    step = device(0.025, 5e-4, 2e-7)
    pacer = PrefillPacer(limit=3.0, min_tokens=16)
    for rows, prompt in ((1, 64), (4, 256), (16, 512)):
        feed(pacer, step, [10] * rows, [(0, prompt)])
    c, a, b = pacer.cost_model()
    for i in range(500):  # a long stretch of 30 rows decoding and no prompt
        feed(pacer, step, [100 + i] * 30, [])
    c2, a2, b2 = pacer.cost_model()
    assert a2 == pytest.approx(5e-4, rel=0.05) and c2 == pytest.approx(0.025, rel=0.05)


def test_context_sum_counts_the_positions_before_each_token():
    assert context_sum(0, 1) == 0 and context_sum(5, 1) == 5
    assert context_sum(10, 4) == 10 + 11 + 12 + 13
