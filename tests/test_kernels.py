"""The CPU kernels (hotswap.server.engine.kernels): the torch reference against
naive dense math, the native C++ kernels against both, and the build cache."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hotswap.server.engine import kernels
from hotswap.server.engine.kernels import native, reference


@pytest.fixture(autouse=True)
def one_thread():
    """Most tests run single-threaded: on a shared 2-core box an OpenMP region
    can wait milliseconds for a descheduled thread, for torch's ops as for ours.
    test_threads_do_not_change_results covers the parallel path."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def needs_native():
    if not kernels.native_available():
        reason = kernels.native_unavailable_reason()
        print(f"native kernels unavailable: {reason}")
        pytest.skip(f"native kernels unavailable on this machine: {reason}")


# ---- paged attention ----------------------------------------------------------

def paged_case(dtype, H, KVH, D, block_size, chunks, seed=0, interleave=False, skipped=2):
    """A packed batch. chunks: one (context_length, query_tokens) per row; the row's
    query tokens are its last positions (a prefill chunk with an offset when
    query_tokens < context_length, decode when 1). Block tables are shuffled."""
    g = torch.Generator().manual_seed(seed)
    per_row = [(length + block_size - 1) // block_size for length, _ in chunks]
    max_blocks = max(per_row) + 1
    num_blocks = sum(per_row) + 5
    # Never-written cache slots hold NaN: nothing outside a row's keys may leak in.
    key_cache = torch.full((num_blocks, block_size, KVH, D), float("nan"), dtype=dtype)
    value_cache = key_cache.clone()
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.full((len(chunks), max_blocks), -1, dtype=torch.int32)
    dense_k, dense_v, rows, positions, used = [], [], [], [], 0
    for r, (length, n) in enumerate(chunks):
        blocks = perm[used : used + per_row[r]]
        used += per_row[r]
        block_tables[r, : per_row[r]] = blocks.int()
        k = torch.randn(length, KVH, D, generator=g).to(dtype)
        v = torch.randn(length, KVH, D, generator=g).to(dtype)
        for j in range(length):
            key_cache[blocks[j // block_size], j % block_size] = k[j]
            value_cache[blocks[j // block_size], j % block_size] = v[j]
        dense_k.append(k)
        dense_v.append(v)
        rows += [r] * n
        positions += list(range(length - n, length))
    order = torch.randperm(len(rows), generator=g).tolist() if interleave else list(range(len(rows)))
    rows, positions = [rows[i] for i in order], [positions[i] for i in order]
    for i in range(skipped):  # tokens of finished rows, to be left alone
        at = (i * 7) % (len(rows) + 1)
        rows.insert(at, -1)
        positions.insert(at, 12345)
    query = torch.randn(len(rows), H, D, generator=g).to(dtype)
    return dict(
        query=query, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
        token_rows=torch.tensor(rows, dtype=torch.int32), token_positions=torch.tensor(positions, dtype=torch.int32),
        dense_k=dense_k, dense_v=dense_v,
    )


def naive_attention(case, scale, window, softcap=0.0, sinks=None):
    """Per token, in float64: the row's keys as a plain tensor, explicit mask, softmax (after Gemma 2's
    soft-capping of the scaled logits; with GPT-OSS's per-head sink logit in the denominator)."""
    q = case["query"].double()
    out = torch.full_like(q, float("nan"))
    H, KVH = q.shape[1], case["key_cache"].shape[2]
    kv_of_head = torch.arange(H) // (H // KVH)
    for i, (r, p) in enumerate(zip(case["token_rows"].tolist(), case["token_positions"].tolist())):
        if r < 0:
            continue
        k = case["dense_k"][r].double()[:, kv_of_head]  # [L, H, D]
        v = case["dense_v"][r].double()[:, kv_of_head]
        j = torch.arange(k.shape[0])
        allowed = (j <= p) & ((j > p - window) if window else True)  # [L]
        scores = torch.einsum("lhd,hd->hl", k, q[i]) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        scores[:, ~allowed] = float("-inf")
        if sinks is not None:
            scores = torch.cat([scores, sinks.double()[:, None]], dim=1)  # [H, L + 1]
        probs = torch.softmax(scores, -1)[:, : k.shape[0]]
        out[i] = torch.einsum("hl,lhd->hd", probs, v)
    return out


def run_attention(case, scale, window, backend, sentinel=123.0, softcap=0.0, sinks=None):
    out = torch.full_like(case["query"], sentinel)
    kernels.paged_attention(
        out, case["query"], case["key_cache"], case["value_cache"], case["block_tables"],
        case["token_rows"], case["token_positions"], scale, window, softcap, sinks, backend=backend,
    )
    return out


SHAPES = [  # (H, KVH, D): GQA groups 3, 1, 4; head dims 64, 80 (not a power of two), 128, 13
    (9, 3, 64),
    (4, 4, 80),
    (8, 2, 128),
    (4, 1, 13),
]
CHUNKS = [(37, 1), (100, 1), (70, 12), (16, 16), (200, 45), (1, 1), (33, 1)]


@pytest.mark.parametrize("H,KVH,D", SHAPES)
@pytest.mark.parametrize("window", [0, 20])
def test_reference_matches_naive(H, KVH, D, window):
    case = paged_case(torch.float32, H, KVH, D, 16, CHUNKS, interleave=True)
    got = run_attention(case, D**-0.5, window, backend="torch")
    want = naive_attention(case, D**-0.5, window)
    skip = case["token_rows"] < 0
    assert (got[skip] == 123.0).all()
    torch.testing.assert_close(got[~skip].double(), want[~skip], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_softcap_and_sinks_match_naive(backend):
    """Soft-capping (Gemma 2) and attention sinks (GPT-OSS) are honoured by every path."""
    case = paged_case(torch.float32, 9, 3, 64, 16, CHUNKS, interleave=True)
    sinks = torch.randn(9, generator=torch.Generator().manual_seed(3))
    skip = case["token_rows"] < 0
    for softcap, sink in [(0.5, None), (0.0, sinks), (0.5, sinks)]:
        got = run_attention(case, 0.125, 20, backend, softcap=softcap, sinks=sink)
        want = naive_attention(case, 0.125, 20, softcap, sink)
        assert (got[skip] == 123.0).all()
        torch.testing.assert_close(got[~skip].double(), want[~skip], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got[~skip].double(), naive_attention(case, 0.125, 20)[~skip], atol=1e-3)


@pytest.mark.skipif(not kernels.native_available(), reason="native kernels not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,KVH,D", SHAPES + [(8, 4, 256)])
def test_native_kernel_softcaps_and_sinks_itself(dtype, H, KVH, D, monkeypatch):
    """The native kernel computes soft-capping and sinks itself (the torch reference, which a call used to
    fall back to at ~50x the time, is not called), in every dtype and geometry, capped logits both in
    tanh's linear range and saturated, sinks that dominate and that vanish."""
    from hotswap.server.engine.kernels import reference

    monkeypatch.setattr(reference, "paged_attention", lambda *a, **k: pytest.fail("took the torch reference"))
    case = paged_case(dtype, H, KVH, D, 16, CHUNKS, interleave=True)
    gen = torch.Generator().manual_seed(5)
    skip = case["token_rows"] < 0
    for softcap, sink in [(30.0, None), (0.2, None), (0.0, 4 * torch.randn(H, generator=gen)),
                          (0.5, torch.full((H,), -1e4)), (0.3, torch.randn(H, generator=gen).to(dtype))]:
        got = run_attention(case, D**-0.5, 20, "native", softcap=softcap, sinks=sink)
        want = naive_attention(case, D**-0.5, 20, softcap, sink)
        assert (got[skip] == 123.0).all()
        tol = 1e-5 if dtype == torch.float32 else TOLERANCE[dtype]
        torch.testing.assert_close(got[~skip].double(), want[~skip], atol=tol, rtol=tol)


TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,KVH,D", SHAPES)
@pytest.mark.parametrize("block_size,window", [(16, 0), (32, 24), (5, 7)])
def test_native_attention_matches_reference(needs_native, dtype, H, KVH, D, block_size, window):
    case = paged_case(dtype, H, KVH, D, block_size, CHUNKS, seed=D + block_size, interleave=block_size == 32)
    scale = 0.7 * D**-0.5
    got = run_attention(case, scale, window, backend="native")
    ref = run_attention(case, scale, window, backend="torch")
    skip = case["token_rows"] < 0
    assert (got[skip] == 123.0).all(), "skipped tokens must be left untouched"
    assert got.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got[~skip].float(), ref[~skip].float(), atol=tol, rtol=tol)
    want = naive_attention(case, scale, window)  # float64, from the same rounded inputs
    torch.testing.assert_close(got[~skip].double(), want[~skip], atol=tol, rtol=tol)


def test_native_attention_long_prefill_chunk_spans_tiles(needs_native):
    # 70 query tokens of one row: several tiles of consecutive tokens, causal inside each.
    case = paged_case(torch.float32, 6, 2, 64, 16, [(300, 70), (50, 1)], seed=3, skipped=0)
    got = run_attention(case, 0.125, 0, backend="native")
    torch.testing.assert_close(got.double(), naive_attention(case, 0.125, 0), atol=2e-5, rtol=2e-5)


def test_threads_do_not_change_results(needs_native):
    # Work items are computed the same way whichever thread takes them: bitwise equal.
    case = paged_case(torch.bfloat16, 9, 3, 64, 16, CHUNKS, seed=5)
    lora = lora_case(torch.bfloat16, 576, 1536, SLOT_PATTERNS["mixed"], seed=5)
    for name in ("a", "b"):
        lora[name] = torch.nan_to_num(lora[name])
    outs = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        t = torch.empty(len(lora["slots"]), 32)
        kernels.lora_shrink(t, lora["x"], lora["a"], lora["slots"], lora["ranks"], backend="native")
        y = lora["fused"][:, :1536].clone()
        kernels.lora_expand(y, t, lora["b"], lora["slots"], lora["ranks"], backend="native")
        outs.append((run_attention(case, 0.125, 0, backend="native"), t, y))
    for one, many in zip(*outs):
        assert torch.equal(one, many)


def test_native_attention_rejects_bad_indices(needs_native):
    case = paged_case(torch.float32, 4, 2, 16, 16, [(20, 1)], skipped=0)
    bad_table = case["block_tables"].clone()
    bad_table[0, 1] = 10_000
    with pytest.raises(RuntimeError, match="block_tables"):
        run_attention({**case, "block_tables": bad_table}, 0.25, 0, backend="native")
    too_far = torch.tensor([case["block_tables"].shape[1] * 16], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="token_positions"):
        run_attention({**case, "token_positions": too_far}, 0.25, 0, backend="native")


# ---- LoRA -------------------------------------------------------------------------

def lora_case(dtype, IN, OUT, slots, seed=0, R=32):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.tensor([8, 16, 32, 5, 0, 20, 1, 32][: max(slots) + 1] or [8], dtype=torch.int32)
    S = ranks.numel()
    a = torch.randn(S, R, IN, generator=g) * IN**-0.5
    b = torch.randn(S, R, OUT, generator=g) * R**-0.5
    for s, r in enumerate(ranks.tolist()):  # a slot's unused rank rows may hold anything
        a[s, r:] = float("nan")
        b[s, r:] = float("nan")
    N = len(slots)
    x = torch.randn(N, IN, generator=g)
    # y is a slice of a wider fused output: rows are strided.
    fused = torch.randn(N, OUT + 24, generator=g).to(dtype)
    return dict(x=x.to(dtype), a=a.to(dtype), b=b.to(dtype), ranks=ranks,
                slots=torch.tensor(slots, dtype=torch.int32), fused=fused)


def naive_lora(case):
    """Per token in float64: t = A[:rank] x, delta = B[:, :rank] t."""
    t = torch.zeros(len(case["slots"]), case["a"].shape[1], dtype=torch.float64)
    delta = torch.zeros(len(case["slots"]), case["b"].shape[2], dtype=torch.float64)
    for i, s in enumerate(case["slots"].tolist()):
        if s < 0:
            continue
        r = int(case["ranks"][s])
        t[i, :r] = case["a"][s, :r].double() @ case["x"][i].double()
        delta[i] = t[i, :r] @ case["b"][s, :r].double()
    return t, delta


SLOT_PATTERNS = {
    "decode": [3, 0, 7, 1, -1, 5, 2, 6, 4, 1, 0, -1],
    "runs": [2] * 23 + [1] * 3 + [-1] * 2 + [0] * 2 + [7] * 5 + [2],
    "mixed": [5] * 40 + [0, 1, 2, 3, -1, 4, 6, 7] + [3] * 17 + [-1],
    # decoding rows of a few adapters scattered through the batch: each slot's tokens form tiles wherever they sit
    "scattered": [2, 5, 2, -1, 5, 0, 2, 2, 5, 7, 2, 0, 5, 2, 2, 2, 2, 5, 1, 2],
}


@pytest.mark.parametrize("pattern", sorted(SLOT_PATTERNS))
def test_reference_lora_matches_naive(pattern):
    case = lora_case(torch.float32, 100, 70, SLOT_PATTERNS[pattern])
    want_t, want_delta = naive_lora(case)
    t = torch.full((len(case["slots"]), 32), 9.0)
    kernels.lora_shrink(t, case["x"], case["a"], case["slots"], case["ranks"], backend="torch")
    torch.testing.assert_close(t.double(), want_t, atol=1e-5, rtol=1e-5)
    y = case["fused"].clone()
    t_garbage = t.clone()
    t_garbage[t == 0] = float("nan")  # t past a token's rank must be ignored
    kernels.lora_expand(y[:, 8 : 8 + 70], t_garbage, case["b"], case["slots"], case["ranks"], backend="torch")
    torch.testing.assert_close(y[:, 8:78].double(), case["fused"][:, 8:78].double() + want_delta, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[:, :8], case["fused"][:, :8]) and torch.equal(y[:, 78:], case["fused"][:, 78:])


LORA_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("IN,OUT", [(576, 1536), (100, 70)])
@pytest.mark.parametrize("pattern", sorted(SLOT_PATTERNS))
def test_native_lora_matches_reference(needs_native, dtype, IN, OUT, pattern):
    case = lora_case(dtype, IN, OUT, SLOT_PATTERNS[pattern], seed=IN + OUT)
    slots, ranks = case["slots"], case["ranks"]
    want_t, want_delta = naive_lora(case)
    atol, rtol = LORA_TOL[dtype]

    t_native, t_ref = torch.full((len(slots), 32), 9.0), torch.full((len(slots), 32), 9.0)
    kernels.lora_shrink(t_native, case["x"], case["a"], slots, ranks, backend="native")
    kernels.lora_shrink(t_ref, case["x"], case["a"], slots, ranks, backend="torch")
    assert (t_native[slots < 0] == 0).all()
    torch.testing.assert_close(t_native, t_ref, atol=1e-5, rtol=1e-5)  # fp32 out, exact-ish either way
    torch.testing.assert_close(t_native.double(), want_t, atol=1e-5, rtol=1e-5)

    t_in = want_t.float()
    t_in[want_t == 0] = float("nan")  # past the rank: must not be read
    y_native, y_ref = case["fused"].clone(), case["fused"].clone()
    kernels.lora_expand(y_native[:, 8 : 8 + OUT], t_in, case["b"], slots, ranks, backend="native")
    kernels.lora_expand(y_ref[:, 8 : 8 + OUT], t_in, case["b"], slots, ranks, backend="torch")
    untouched = torch.ones_like(y_native, dtype=torch.bool)
    untouched[slots >= 0, 8 : 8 + OUT] = False
    assert torch.equal(y_native[untouched], case["fused"][untouched]), "rows without LoRA and columns outside y changed"
    torch.testing.assert_close(y_native.float(), y_ref.float(), atol=atol, rtol=rtol)
    want_y = case["fused"][:, 8 : 8 + OUT].double() + want_delta
    torch.testing.assert_close(y_native[:, 8 : 8 + OUT].double(), want_y, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_lora_token_results_do_not_depend_on_batch_mates(needs_native, dtype):
    """A token's shrink and expand results are bit for bit the same whether it shares its tiles with
    other tokens of its slot (scattered through the batch) or runs alone."""
    case = lora_case(dtype, 576, 1536, SLOT_PATTERNS["scattered"], seed=3)
    slots, ranks = case["slots"], case["ranks"]
    t = torch.empty(len(slots), 32)
    kernels.lora_shrink(t, case["x"], case["a"], slots, ranks, backend="native")
    y = case["fused"].clone()
    kernels.lora_expand(y[:, 8 : 8 + 1536], t, case["b"], slots, ranks, backend="native")
    for i in range(len(slots)):
        t_one = torch.empty(1, 32)
        kernels.lora_shrink(t_one, case["x"][i : i + 1], case["a"], slots[i : i + 1], ranks, backend="native")
        y_one = case["fused"][i : i + 1].clone()
        kernels.lora_expand(y_one[:, 8 : 8 + 1536], t_one, case["b"], slots[i : i + 1], ranks, backend="native")
        assert torch.equal(t_one[0], t[i]) and torch.equal(y_one[0], y[i]), i


# ---- dispatch, fallback, build cache, torch.compile ----------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [576, 100, 7])
@pytest.mark.parametrize("weight_first", [False, True])
def test_native_rms_norm_matches_reference(needs_native, dtype, D, weight_first):
    """Row lengths off the 16-lane grid, both rounding orders: the same values as the eager formula
    up to the order of the mean's fp32 sum (nearly every output bit-equal)."""
    gen = torch.Generator().manual_seed(D)
    x = (torch.randn(37, D, generator=gen) * 3).to(dtype)
    w = torch.randn(D, generator=gen).to(dtype)
    want = reference.rms_norm(x, w, 1e-6, weight_first)
    got = kernels.rms_norm(x, w, 1e-6, weight_first, backend="native")
    assert got.dtype == dtype and got.shape == x.shape
    if dtype != torch.float32:
        assert (got == want).float().mean() > 0.999
    step = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-20}[dtype]
    assert ((got.float() - want.float()).abs() <= want.float().abs() * step + 1e-6).all()
    rows = torch.randn(5, 3, D, generator=gen).to(dtype)[:, 1]  # strided rows: the op takes [..., D] views
    torch.testing.assert_close(kernels.rms_norm(rows, w, 1e-6, weight_first, backend="native"),
                               reference.rms_norm(rows, w, 1e-6, weight_first), rtol=step, atol=1e-6)


def test_native_bf16_stores_round_denormals_and_nans_as_torch(needs_native):
    """The kernels' bf16 stores round like c10::BFloat16 also where the hardware conversion would not:
    denormal results (flushed to zero by vcvtneps2bf16) and NaN (kept with its payload by it)."""
    x = torch.ones(3, 40, dtype=torch.bfloat16)
    w = torch.full((40,), 1e-39, dtype=torch.bfloat16)  # a bf16 denormal: every output is one too
    w[5], w[33] = 0.5, float("nan")
    got = kernels.rms_norm(x, w, 1e-6, False, backend="native")
    want = reference.rms_norm(x, w, 1e-6, False)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # bit for bit, NaN's bits included
    assert got[0, 0].item() != 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [49152, 1000, 33, 16, 5, 1])
def test_native_row_max_answers_as_torch_max(needs_native, V, dtype):
    """Value and first index of each row's maximum, as torch.max(dim=-1): ties across vector lanes and
    in the tail, NaN (the first one wins), infinities, rows of -inf, strided rows."""
    gen = torch.Generator().manual_seed(V)
    x = torch.randn(12, V, generator=gen)
    top = x.max()
    x[1, [V // 2, V - 1, 3 % V]] = top + 1  # a tie: the first index wins
    x[2, [V - 1, 0]] = top + 2
    x[3] = float("-inf")
    x[4] = 2.0  # every element equal
    x[5, V // 3] = float("inf")
    x[6, [V - 1, V // 2]] = float("nan")  # NaN beats everything, the first NaN is the answer
    x[7, 0] = float("nan")
    x[8, V - 1] = float("nan")
    x[9, [V // 2, V - 1]] = float("inf")
    x[9, V // 4] = float("nan") if V > 4 else x[9, V // 4]
    rows = torch.randn(12, 3, V, generator=gen)[:, 1]  # strided rows
    for case in (x.to(dtype), rows.to(dtype), x[:0].to(dtype)):  # (rows stay strided in fp32 only)
        values, indices = kernels.row_max(case, backend="native")
        want_values, want_indices = case.float().max(dim=-1)
        assert values.dtype == torch.float32 and indices.dtype == torch.int64 and torch.equal(indices, want_indices)
        torch.testing.assert_close(values, want_values, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("H,KVH,D", [(9, 3, 64), (4, 4, 80), (2, 1, 2), (3, 1, 608)])
def test_native_rotary_matches_the_eager_formula(needs_native, dtype, H, KVH, D):
    """transformers' apply_rotary_pos_emb bit for bit in bf16 / fp16 (fp32 within its rounding: the kernel
    may fuse a product into the sum): heads handed over as transposed [B, T, H, D] views (outputs keep
    that layout), cos / sin shared by the batch (B = 1) or per batch row, half widths off the 16-lane grid
    and above the cos / sin vectors held per pass (608), NaN and infinities carried through."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(D)
    for B, T, cos_batch in [(1, 37, 1), (2, 5, 2), (2, 3, 1), (1, 0, 1)]:
        q = (torch.randn(B, T, H, D, generator=gen) * 3).to(dtype).transpose(1, 2)
        k = (torch.randn(B, T, KVH, D, generator=gen) * 3).to(dtype).transpose(1, 2)
        if T:
            q[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])[:D]
        angles = torch.rand(cos_batch, T, D, generator=gen) * 100
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        want = apply_rotary_pos_emb(q, k, cos, sin)
        got = kernels.rotary(q, k, cos, sin, backend="native")
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == dtype
            assert [st for st, n in zip(g.stride(), g.shape) if n > 1] == [st for st, n in zip(w.stride(), w.shape) if n > 1]
            if dtype == torch.float32:
                torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-5, equal_nan=True)
            else:
                assert torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0)) and torch.equal(g.isnan(), w.isnan())
        for g, r in zip(got, reference.rotary(q, k, cos, sin)):
            torch.testing.assert_close(g, r, rtol=2e-6 if dtype == torch.float32 else 0, atol=1e-5 if dtype == torch.float32 else 0,
                                       equal_nan=True)


def test_native_rotary_refuses_mismatched_shapes(needs_native):
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    cos = torch.randn(1, 5, 16)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        torch.ops.hotswap.rotary(torch.empty_like(q), torch.empty_like(k), q, k, cos[:, :4], cos[:, :4])
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        q3, k3, c3 = q[..., :15], k[..., :15], cos[..., :15]
        torch.ops.hotswap.rotary(torch.empty_like(q3), torch.empty_like(k3), q3, k3, c3, c3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kv_write_matches_index_copy(needs_native, dtype):
    """Keys and values of strided [tokens, kv_heads, head_dim] views (how a layer hands them over)
    land in the same slots as index_copy_ puts them; nothing else changes; a slot outside the
    cache is refused."""
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(9, 4, 3, 16, generator=gen).to(dtype) for _ in range(2))
    key = torch.randn(1, 3, 7, 16, generator=gen).to(dtype)[0].transpose(0, 1)  # [7, 3, 16], token axis strided
    value = torch.randn(1, 3, 7, 16, generator=gen).to(dtype)[0].transpose(0, 1)
    slots = torch.tensor([35, 0, 17, 18, 4, 33, 12])
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.kv_write(want_k, want_v, key, value, slots)
    kernels.kv_write(k_cache, v_cache, key, value, slots, backend="native")
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(RuntimeError, match="outside"):
        kernels.kv_write(k_cache, v_cache, key[:1], value[:1], torch.tensor([36]), backend="native")


def test_backend_selection(monkeypatch):
    case = lora_case(torch.float32, 16, 16, [0, 1])
    calls = []
    monkeypatch.setattr(reference, "lora_shrink", lambda *a: calls.append("torch"))
    t = torch.empty(2, 32)
    kernels.set_backend("torch")
    try:
        kernels.lora_shrink(t, case["x"], case["a"], case["slots"], case["ranks"])
    finally:
        kernels.set_backend("auto")
    assert calls == ["torch"]
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("cuda-graphs")
    with pytest.raises(ValueError, match="CPU tensors"):
        kernels.lora_shrink(t.to("meta"), case["x"].to("meta"), case["a"].to("meta"), case["slots"], case["ranks"], backend="native")


def test_build_hash_names_everything_the_binary_depends_on(tmp_path):
    sources = {"a.cpp": b"int f();"}
    base = native.build_hash(native.CFLAGS, sources, cpu_flags="avx2 fma")
    assert native.build_hash(native.CFLAGS, sources, cpu_flags="avx2 fma") == base
    assert native.build_hash(native.CFLAGS + ("-DX",), sources, cpu_flags="avx2 fma") != base
    assert native.build_hash(native.CFLAGS, {"a.cpp": b"int g();"}, cpu_flags="avx2 fma") != base
    assert native.build_hash(native.CFLAGS, sources, cpu_flags="avx2 fma avx512f") != base
    folder = native.build_directory(tmp_path)
    assert folder.parent == tmp_path and folder.name == native.build_hash()
    assert native.build_directory(tmp_path, native.CFLAGS + ("-DX",)) != folder


def _python(code: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_second_load_in_a_fresh_process_reuses_the_build(needs_native):
    library = next(native.build_directory().glob("*.so"))
    before = library.stat().st_mtime_ns
    out = _python("""
        from hotswap.server.engine.kernels import native
        print(native.load())
    """)
    assert out.split() == ["True"]
    assert library.stat().st_mtime_ns == before, "the extension was rebuilt"


def test_kernels_link_torchs_libgomp_when_another_is_mapped_first():
    """sentencepiece's wheel bundles its own libgomp, loaded with the default model's tokenizer. Mapped at a
    lower address than torch's, it was the copy the kernels were linked to (the first libgomp in
    /proc/self/maps), and the build's folder hash changed with the import order: a process that
    imported sentencepiece first built the kernels a second time."""
    pytest.importorskip("sentencepiece")
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not run on OpenMP here")
    out = _python("""
        import torch
        from hotswap.server.engine.kernels import native
        before = native.build_directory()
        import sentencepiece  # its libgomp is mapped now, first or not
        print(native.torch_libgomp(), native.build_directory() == before)
    """)
    libgomp, same_folder = out.split()
    assert "sentencepiece" not in libgomp and same_folder == "True"
    with open(f"/proc/{os.getpid()}/maps") as maps:  # this process's torch: the file its libtorch_cpu needs
        ours = {line.split()[-1] for line in maps if "libgomp" in line and "sentencepiece" not in line}
    assert libgomp in ours


def test_lora_apply_is_shrink_scale_expand_bit_for_bit(needs_native):
    """The fused call an engine step makes per linear, against the three steps it stands for: every dtype,
    rows without LoRA, per-token scales (contiguous or a row's scale expanded), strided y rows."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        case = lora_case(dtype, 576, 70, SLOT_PATTERNS["mixed"], seed=5)
        slots, ranks, n = case["slots"], case["ranks"], len(case["slots"])
        x, a, b = case["x"].to(dtype), case["a"].to(dtype), case["b"].to(dtype)
        scales = torch.linspace(0.25, 2.0, n)
        for token_scales in (None, scales, scales[:, None], torch.tensor(0.5).expand(n)):
            t = torch.empty(n, a.shape[1])
            kernels.lora_shrink(t, x, a, slots, ranks, backend="native")
            if token_scales is not None:
                t.mul_(token_scales.reshape(-1, 1))
            want = case["fused"].clone()
            kernels.lora_expand(want[:, 8 : 8 + 70], t, b, slots, ranks, backend="native")
            for backend in ("native", "torch"):
                got = case["fused"].clone()
                kernels.lora_apply(got[:, 8 : 8 + 70], x, a, b, slots, ranks, token_scales, backend=backend)
                if backend == "native":
                    assert torch.equal(got, want), (dtype, token_scales)
                else:
                    atol, rtol = LORA_TOL[dtype]
                    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    with pytest.raises(RuntimeError, match="b_slots must be"):
        kernels.lora_apply(torch.zeros(n, 70), x.float(), a.float(), b.float()[:, :, :60], slots, ranks, backend="native")
    with pytest.raises(RuntimeError, match="token_scales must be"):
        torch.ops.hotswap.lora_apply(torch.zeros(n, 70), x.float(), a.float(), b.float(), slots, ranks, torch.ones(n + 1))


def test_build_failure_falls_back_to_the_reference(tmp_path):
    out = _python(f"""
        import logging, torch
        records = []
        logging.getLogger("hotswap.kernels").addHandler(type("H", (logging.Handler,), {{"emit": lambda s, r: records.append(r)}})())
        from hotswap.server.engine import kernels
        assert not kernels.load({str(tmp_path)!r})
        assert not kernels.native_available()
        out = torch.zeros(3, 16)
        kernels.lora_shrink(out, torch.randn(3, 8), torch.randn(2, 16, 8), torch.tensor([0, -1, 1], dtype=torch.int32),
                            torch.tensor([4, 16], dtype=torch.int32))
        assert out[1].eq(0).all() and out[0, 4:].eq(0).all() and out[0, :4].ne(0).all()
        print(len(records), kernels.native_unavailable_reason())
    """, env={"CXX": "/nonexistent/c++"})
    count, reason = out.split(" ", 1)
    assert count == "1" and "compiler" in reason


def test_ops_trace_into_a_compiled_graph(needs_native):
    case = paged_case(torch.float32, 4, 2, 16, 16, [(20, 1), (9, 3)], skipped=1)
    args = [case[k] for k in ("query", "key_cache", "value_cache", "block_tables", "token_rows", "token_positions")]

    def step(out, *args):
        kernels.paged_attention(out, *args, 0.25, 0)
        return out * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(torch.zeros_like(case["query"]), *args)
    want = step(torch.zeros_like(case["query"]), *args)
    torch.testing.assert_close(got, want)

    lora = lora_case(torch.float32, 64, 48, SLOT_PATTERNS["decode"], seed=1)
    lora_args = [lora[k] for k in ("x", "a", "b", "slots", "ranks")] + [torch.linspace(0.5, 1.5, len(lora["slots"]))]

    def apply(y, *args):  # the engine's per-linear LoRA call, with per-token scales
        kernels.lora_apply(y, *args)
        return y * 2

    y = torch.randn(len(lora["slots"]), 48)
    got = torch.compile(apply, fullgraph=True, backend="aot_eager")(y.clone(), *lora_args)
    torch.testing.assert_close(got, apply(y.clone(), *lora_args))
