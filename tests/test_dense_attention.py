"""A long prompt chunk's attention over its row's paged blocks (attention.dense_chunk_attention),
against attention computed in float64 from the same keys and values."""
from __future__ import annotations

import pytest
import torch

from hotswap.server.engine.attention import SPLIT_MIN_CONTEXT, SPLIT_MIN_TOKENS, DenseRule, dense_chunk_attention, dense_rule
from hotswap.server.engine import kernels

BS = 16


def truth(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float, window: int) -> torch.Tensor:
    """q [n, heads, d] at positions start..; k, v [start + n, kv_heads, d] → [n, heads, d] float64."""
    group = q.shape[1] // k.shape[1]
    kd, vd = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kd) * scale
    q_pos = torch.arange(start, start + q.shape[0])[:, None]
    k_pos = torch.arange(k.shape[0])[None, :]
    seen = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~seen, float("-inf")).softmax(-1), vd)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("start,n,window", [(0, 70, 0), (37, 70, 0), (300, 45, 0), (300, 45, 64), (90, 33, 500),
                                            (37, SPLIT_MIN_TOKENS + 9, 0), (SPLIT_MIN_CONTEXT + 5, 11, 0)])
def test_chunk_attends_to_earlier_positions_and_itself_causally(dtype, tol, heads, kv_heads, start, n, window):
    g = torch.Generator().manual_seed(start * 1000 + n)
    blocks = -(-(start + n) // BS) + 3
    k_cache = torch.randn(blocks, BS, kv_heads, 32, generator=g).to(dtype)
    v_cache = torch.randn(blocks, BS, kv_heads, 32, generator=g).to(dtype)
    table = torch.randperm(blocks, generator=g).to(torch.int32)  # the row's blocks, scattered over the pool
    q = torch.randn(n, heads, 32, generator=g).to(dtype)
    got = dense_chunk_attention(q, k_cache, v_cache, table, start, 32 ** -0.5, window)
    k = k_cache[table.long()].flatten(0, 1)[: start + n]
    v = v_cache[table.long()].flatten(0, 1)[: start + n]
    assert got.shape == q.shape and got.dtype == dtype
    assert (got.double() - truth(q, k, v, start, 32 ** -0.5, window)).abs().max().item() < tol


def test_a_continued_chunk_agrees_with_the_masked_pass():
    """Continuing a row (start > 0) with a long chunk takes two flash passes merged by log-sum-exp on
    CPU; a window wider than the row sends the same attention through one masked pass instead."""
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(80, BS, 2, 64, generator=g), torch.randn(80, BS, 2, 64, generator=g)
    table = torch.arange(80, dtype=torch.int32)
    q = torch.randn(SPLIT_MIN_TOKENS, 6, 64, generator=g)
    split = dense_chunk_attention(q, k_cache, v_cache, table, 400, 0.125, 0)
    masked = dense_chunk_attention(q, k_cache, v_cache, table, 400, 0.125, 10_000)
    torch.testing.assert_close(split, masked, rtol=1e-5, atol=1e-6)


def test_dense_rule_reads_the_threshold_of_the_chunks_context():
    rule = DenseRule((256, 1024, 4096), (None, 16, 8))
    assert not rule.takes(0, 10_000) and not rule.takes(1023, 10_000)  # below 1,024 keys: never
    assert not rule.takes(1024, 15) and rule.takes(1024, 16) and rule.takes(4095, 16) and not rule.takes(4095, 8)
    assert rule.takes(4096, 8) and rule.takes(100_000, 8) and not rule.takes(100_000, 7)


@pytest.mark.skipif(not kernels.native_available(), reason="native kernels unavailable on this machine")
def test_measured_dense_rule_never_asks_more_of_a_longer_context():
    rule = dense_rule(6, 2, 32, torch.bfloat16, torch.device("cpu"), BS)
    if rule is None:
        return  # the native kernel won everywhere on this machine
    assert rule.contexts == tuple(sorted(rule.contexts))
    for shorter, longer in zip(rule.min_tokens, rule.min_tokens[1:]):
        assert shorter is None or (longer is not None and longer <= shorter)
    assert dense_rule(6, 2, 32, torch.bfloat16, torch.device("cpu"), BS) is rule  # measured once per geometry
