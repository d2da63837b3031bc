"""Triton kernels for the packed step on CUDA: paged attention over the block tables and
per-token LoRA shrink / expand, same signatures and contracts as `reference`.

Everything a kernel needs is computed on the device, so a step launches them without a
host sync and with shapes that depend only on the token count (what CUDA graphs need):
the LoRA kernels take a `LoraPlan` (tokens grouped by slot, cut into tiles) built once per
step by torch ops, its tile table sized by an upper bound instead of a count read back.

Sums are fp32 and products exact (bf16 / fp16 tensor-core products are exact in fp32;
fp32 operands use IEEE dots, not TF32), so results match the fp32 reference up to the
order of the sums. `TRITON_INTERPRET=1` (set before this module is imported) runs them
on CPU tensors, which is how the tests check them on a machine without a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .lora_plan import LORA_BLOCK_M, LoraPlan, lora_plan

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Kernels run in Triton's interpreter (on CPU tensors) instead of being compiled. Its tl.dot of
bf16 operands is wrong (triton 3.8), so there every dot widens to fp32 first."""


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # bf16 / fp16 operands: tensor-core products, exact in the fp32 accumulator; IEEE: both widened to
    # fp32 and multiplied in fp32 (fp32 inputs, whose default would be TF32, and the interpreter).
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


# ---- paged attention ---------------------------------------------------------------

@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, bt_ptr, rows_ptr, pos_ptr, sinks_ptr,
    scale, softcap, window,
    s_qn, s_qh, s_on, s_oh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_bt,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr, IEEE: tl.constexpr,
):
    # One query token and one kv head: the GROUP query heads that read it, as one [G_PAD, D] tile, with an
    # online softmax over the row's keys lo..p, BLOCK_N keys (BLOCK_N // BLOCK_SIZE cache blocks) at a time.
    tok = tl.program_id(0)
    kvh = tl.program_id(1)
    row = tl.load(rows_ptr + tok)
    if row >= 0:
        p = tl.load(pos_ptr + tok)
        lo = tl.maximum(p - window + 1, 0)  # window: the host passes no window as 2**30
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        heads = kvh * GROUP + g
        g_ok = g < GROUP
        d_ok = d < D
        q = tl.load(q_ptr + tok * s_qn + heads[:, None] * s_qh + d[None, :], mask=g_ok[:, None] & d_ok[None, :],
                    other=0.0).to(k_ptr.dtype.element_ty)  # [G_PAD, D_PAD]
        if SINKS:
            # GPT-OSS: one extra logit per head in the denominator; it carries no value.
            m = tl.load(sinks_ptr + heads, mask=g_ok, other=0.0).to(tl.float32)  # [G_PAD]
            l = tl.full([G_PAD], 1.0, tl.float32)
        else:
            m = tl.full([G_PAD], float("-inf"), tl.float32)
            l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for j0 in range(lo // BLOCK_N * BLOCK_N, p + 1, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            ok = (j >= lo) & (j <= p)
            blk = tl.load(bt_ptr + row * s_bt + j // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
            off = j % BLOCK_SIZE
            kv_ok = ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + blk[:, None] * s_kb + off[:, None] * s_ks + kvh * s_kh + d[None, :], mask=kv_ok,
                        other=0.0)  # [BLOCK_N, D_PAD]
            s = _dot(q, tl.trans(k), IEEE) * scale  # [G_PAD, BLOCK_N] fp32
            if SOFTCAP:
                s = softcap * _tanh(s / softcap)
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            pr = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(pr, 1)
            # Masked keys load as 0: a never-written slot's NaN never meets a zero probability.
            v = tl.load(v_ptr + blk[:, None] * s_vb + off[:, None] * s_vs + kvh * s_vh + d[None, :], mask=kv_ok,
                        other=0.0).to(tl.float32)  # [BLOCK_N, D_PAD]
            acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision="ieee")  # probabilities stay fp32
            m = m_new
        o = acc / l[:, None]
        tl.store(out_ptr + tok * s_on + heads[:, None] * s_oh + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & d_ok[None, :])


def paged_attention(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, token_rows: torch.Tensor, token_positions: torch.Tensor, scale: float,
                    sliding_window: int = 0, softcap: float = 0.0, sinks: torch.Tensor | None = None) -> None:
    """As `ops.paged_attention` (softcap and sinks included). out, query [N, H, D] with the head dim
    contiguous; caches [blocks, block_size, KVH, D] with the head dim contiguous."""
    N, H, D = query.shape
    _, block_size, KVH, _ = key_cache.shape
    if N == 0:
        return
    group = H // KVH
    block_n = max(16, block_size, 64 if D <= 128 else 32)
    block_n = triton.next_power_of_2(block_n)
    sinks_arg = sinks.float().contiguous() if sinks is not None else token_positions  # unread without SINKS
    _paged_attention_kernel[(N, KVH)](
        out, query, key_cache, value_cache, block_tables, token_rows, token_positions, sinks_arg,
        float(scale), float(softcap), int(sliding_window) if sliding_window > 0 else 2**30,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_tables.stride(0),
        GROUP=group, G_PAD=_pow2(group), D=D, D_PAD=_pow2(D), BLOCK_SIZE=block_size, BLOCK_N=block_n,
        SOFTCAP=softcap > 0, SINKS=sinks is not None, IEEE=key_cache.dtype == torch.float32 or INTERPRET,
    )


def paged_attention_fits(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """Layouts the kernel takes: head dims contiguous, whole GQA groups."""
    return (out.stride(-1) == query.stride(-1) == key_cache.stride(-1) == value_cache.stride(-1) == 1
            and query.shape[1] % key_cache.shape[2] == 0)


# ---- LoRA ----------------------------------------------------------------------------

@triton.jit
def _tile(tiles_ptr, order_ptr, ranks_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: its token count, slot and the slot's rank, the tokens' batch rows
    [BLOCK_M] (int64) and which of the BLOCK_M are real."""
    tile = tl.program_id(0)
    first = tl.load(tiles_ptr + tile * 3)
    count = tl.load(tiles_ptr + tile * 3 + 1)
    slot = tl.load(tiles_ptr + tile * 3 + 2)
    rank = tl.load(ranks_ptr + slot)
    m_ok = tl.arange(0, BLOCK_M) < count
    tok = tl.load(order_ptr + first + tl.arange(0, BLOCK_M), mask=m_ok, other=0).to(tl.int64)
    return count, slot, rank, tok, m_ok


@triton.jit
def _lora_shrink_kernel(out_ptr, x_ptr, a_ptr, ranks_ptr, order_ptr, tiles_ptr, IN, R,
                        s_on, s_xn, s_as, s_ar,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    # out[tok, r] = A[slot, r] . x[tok] for BLOCK_M tokens of one slot and BLOCK_R of its rank rows; rows at
    # or past the slot's rank are written as 0.
    count, slot, rank, tok, m_ok = _tile(tiles_ptr, order_ptr, ranks_ptr, BLOCK_M)
    if count > 0:
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < IN
            x = tl.load(x_ptr + tok[:, None] * s_xn + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_ptr + slot.to(tl.int64) * s_as + r[:, None] * s_ar + k[None, :],
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
            acc += _dot(x, tl.trans(a), IEEE)
        tl.store(out_ptr + tok[:, None] * s_on + r[None, :], acc, mask=m_ok[:, None] & (r < R)[None, :])


@triton.jit
def _lora_expand_kernel(y_ptr, t_ptr, b_ptr, ranks_ptr, order_ptr, tiles_ptr, OUT,
                        s_yn, s_tn, s_bs, s_br,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[tok, n] += t[tok, :rank] . B[slot, :rank, n] in fp32 from y, rounded once.
    count, slot, rank, tok, m_ok = _tile(tiles_ptr, order_ptr, ranks_ptr, BLOCK_M)
    if count > 0:
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < OUT
        y_ptrs = y_ptr + tok[:, None] * s_yn + n[None, :]
        yo_ok = m_ok[:, None] & n_ok[None, :]
        acc = tl.load(y_ptrs, mask=yo_ok, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_N]
        for r0 in range(0, rank, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            r_ok = r < rank
            t = tl.load(t_ptr + tok[:, None] * s_tn + r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            b = tl.load(b_ptr + slot.to(tl.int64) * s_bs + r[:, None] * s_br + n[None, :],
                        mask=r_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_N]
            acc += tl.dot(t, b, input_precision="ieee")
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=yo_ok)


def lora_shrink(out: torch.Tensor, x: torch.Tensor, a_slots: torch.Tensor, token_slots: torch.Tensor,
                ranks: torch.Tensor, plan: LoraPlan | None = None) -> None:
    """As `ops.lora_shrink`; `plan` (lora_plan of token_slots) is built here when not given."""
    S, R, IN = a_slots.shape
    out.zero_()  # tokens without a slot are in no tile
    if x.shape[0] == 0 or R == 0:
        return
    plan = plan or lora_plan(token_slots, S)
    block_r = 16 if R <= 16 else 32
    _lora_shrink_kernel[(plan.tiles.shape[0], triton.cdiv(R, block_r))](
        out, x, a_slots, ranks, plan.order, plan.tiles, IN, R, out.stride(0), x.stride(0), a_slots.stride(0),
        a_slots.stride(1), BLOCK_M=LORA_BLOCK_M, BLOCK_R=block_r, BLOCK_K=64, IEEE=x.dtype == torch.float32 or INTERPRET)


def lora_expand(y: torch.Tensor, t: torch.Tensor, b_slots: torch.Tensor, token_slots: torch.Tensor,
                ranks: torch.Tensor, plan: LoraPlan | None = None) -> None:
    """As `ops.lora_expand`; `plan` (lora_plan of token_slots) is built here when not given."""
    S, R, OUT = b_slots.shape
    if y.shape[0] == 0 or R == 0:
        return
    plan = plan or lora_plan(token_slots, S)
    _lora_expand_kernel[(plan.tiles.shape[0], triton.cdiv(OUT, 64))](
        y, t, b_slots, ranks, plan.order, plan.tiles, OUT, y.stride(0), t.stride(0), b_slots.stride(0), b_slots.stride(1),
        BLOCK_M=LORA_BLOCK_M, BLOCK_N=64, BLOCK_K=16)


def lora_fits(y: torch.Tensor, x_or_t: torch.Tensor, slots: torch.Tensor) -> bool:
    """Layouts the LoRA kernels take: the feature axes contiguous."""
    return y.stride(-1) == 1 and x_or_t.stride(-1) == 1 and slots.stride(-1) == 1
