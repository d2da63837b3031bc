"""The public kernel entry points: native C++ on CPU when it is built, Triton on CUDA
when it imports, the torch reference otherwise (no compiler, a failed build, other
devices). Paged attention and LoRA have Triton kernels; the other ops run their torch
reference on CUDA.

`set_backend` (process-wide) or `backend=` (one call) forces a path:
"auto" (default), "native" or "triton" (each raises if it cannot run) or "torch".
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

from . import native, reference
from .lora_plan import LoraPlan

BACKENDS = ("auto", "native", "triton", "torch")
_default = "auto"
_triton: ModuleType | None = None
_triton_error: str | None = None


def set_backend(name: str) -> None:
    """Process-wide default path for every kernel: "auto", "native", "triton" or "torch"."""
    global _default
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _default = name


def get_backend() -> str:
    return _default


def native_available() -> bool:
    """True when the C++ extension is built and loaded on this machine (builds it on the first call)."""
    return native.load()


def native_unavailable_reason() -> str | None:
    native.load()
    return native.unavailable_reason()


def triton_ops() -> ModuleType | None:
    """The Triton kernels (`triton_ops`), imported on first use; None where Triton does not import."""
    global _triton, _triton_error
    if _triton is None and _triton_error is None:
        try:
            _triton = importlib.import_module(f"{__package__}.triton_ops")
        except Exception as e:  # noqa: BLE001 - no triton, or one that fails to initialise: the torch path runs
            _triton_error = f"{type(e).__name__}: {e}"
    return _triton


def triton_available(device: torch.device | str = "cuda") -> bool:
    """True when the Triton kernels can run on `device`: CUDA, or any device under TRITON_INTERPRET=1."""
    mod = triton_ops()
    return mod is not None and (torch.device(device).type == "cuda" or mod.INTERPRET)


def triton_unavailable_reason() -> str | None:
    triton_ops()
    return _triton_error


def _path(t: torch.Tensor, backend: str | None) -> str:
    """"native", "triton" or "torch": which implementation runs an op on tensor t."""
    choice = backend or _default
    if choice == "torch":
        return "torch"
    if choice == "auto":
        if t.device.type == "cpu":
            return "native" if native.load() else "torch"
        return "triton" if t.device.type == "cuda" and triton_available(t.device) else "torch"
    if choice == "native":
        if t.device.type != "cpu":
            raise ValueError(f"the native kernels take CPU tensors, got {t.device}")
        if not native.load():
            raise RuntimeError(f"native kernels unavailable: {native.unavailable_reason()}")
        return "native"
    if choice == "triton":
        if not triton_available(t.device):
            why = triton_unavailable_reason() or f"{t.device} tensors need CUDA (or TRITON_INTERPRET=1)"
            raise RuntimeError(f"triton kernels unavailable: {why}")
        return "triton"
    raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")


def _use_native(t: torch.Tensor, backend: str | None) -> bool:
    return _path(t, backend) == "native"


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
    *,
    backend: str | None = None,
) -> None:
    """out[i] = softmax(scale * q_i K^T) V over row token_rows[i]'s keys at positions
    max(0, p - sliding_window + 1) ..= p, p = token_positions[i]; rows -1 are skipped.
    softcap > 0: logits become softcap * tanh(logits / softcap) (Gemma 2); sinks [H]: one extra
    logit per query head in the softmax's denominator (GPT-OSS). Every path has both.

    out, query [N, H, D]; key_cache, value_cache [num_blocks, block_size, KVH, D];
    block_tables [R, max_blocks] int32; token_rows, token_positions [N] int32.
    Query head h reads kv head h // (H // KVH)."""
    path = _path(query, backend)
    if path == "triton" and triton_ops().paged_attention_fits(out, query, key_cache, value_cache):
        triton_ops().paged_attention(out, query, key_cache, value_cache, block_tables, token_rows, token_positions, scale,
                                     sliding_window, softcap, sinks)
    elif path == "native":
        torch.ops.hotswap.paged_attention(
            out, query, key_cache, value_cache, block_tables, token_rows, token_positions, float(scale), int(sliding_window),
            float(softcap), None if sinks is None else sinks.to(torch.float32).contiguous()
        )
    else:
        reference.paged_attention(out, query, key_cache, value_cache, block_tables, token_rows, token_positions, scale,
                                  sliding_window, softcap, sinks)


def lora_shrink(
    out: torch.Tensor, x: torch.Tensor, a_slots: torch.Tensor, token_slots: torch.Tensor, ranks: torch.Tensor, *,
    backend: str | None = None, plan: LoraPlan | None = None
) -> None:
    """out[t, :ranks[s]] = a_slots[s, :ranks[s]] @ x[t] with s = token_slots[t]; the rest of
    out[t] is 0, all of it when s == -1.

    out [N, R] float32; x [N, IN]; a_slots [S, R, IN] (x's dtype); token_slots [N], ranks [S] int32.
    plan: `lora_plan(token_slots, S)`, shared by a step's calls on the Triton path (built when None)."""
    path = _path(x, backend)
    if path == "triton" and triton_ops().lora_fits(out, x, token_slots):
        triton_ops().lora_shrink(out, x, a_slots, token_slots, ranks, plan)
    elif path == "native":
        torch.ops.hotswap.lora_shrink(out, x, a_slots, token_slots, ranks)
    else:
        reference.lora_shrink(out, x, a_slots, token_slots, ranks)


def lora_expand(
    y: torch.Tensor, t: torch.Tensor, b_slots: torch.Tensor, token_slots: torch.Tensor, ranks: torch.Tensor, *,
    backend: str | None = None, plan: LoraPlan | None = None
) -> None:
    """y[t] += t[t, :ranks[s]] @ b_slots[s, :ranks[s]] with s = token_slots[t]; rows with s == -1
    are left alone. Accumulates in fp32 and rounds y once.

    y [N, OUT] (rows may be strided, e.g. a slice of a fused output); t [N, R] float32;
    b_slots [S, R, OUT] (y's dtype, scale folded in: each rank's row of outputs contiguous, so a
    low-rank adapter in wide slots reads only its own rows); token_slots [N], ranks [S] int32.
    plan: as lora_shrink's."""
    path = _path(y, backend)
    if path == "triton" and triton_ops().lora_fits(y, t, token_slots):
        triton_ops().lora_expand(y, t, b_slots, token_slots, ranks, plan)
    elif path == "native":
        torch.ops.hotswap.lora_expand(y, t, b_slots, token_slots, ranks)
    else:
        reference.lora_expand(y, t, b_slots, token_slots, ranks)


def lora_apply(
    y: torch.Tensor, x: torch.Tensor, a_slots: torch.Tensor, b_slots: torch.Tensor, token_slots: torch.Tensor,
    ranks: torch.Tensor, token_scales: torch.Tensor | None = None, *, backend: str | None = None, plan: LoraPlan | None = None
) -> None:
    """y[t] += token_scales[t] · b_slots[s, :ranks[s]]ᵀ (a_slots[s, :ranks[s]] x[t]) with s = token_slots[t]:
    lora_shrink, the scales, then lora_expand (rows with s == -1 are left alone). One native call on CPU;
    the same results as the three steps.

    y [N, OUT] (rows may be strided); x [N, IN]; a_slots [S, R, IN], b_slots [S, R, OUT], all of y's dtype;
    token_slots [N], ranks [S] int32; token_scales [N] or [N, 1] float32, or None for 1. plan: as lora_shrink's."""
    path = _path(x, backend)
    if path == "native":
        if token_scales is not None and not (token_scales.dtype == torch.float32 and token_scales.is_contiguous()):
            token_scales = token_scales.float().contiguous()  # e.g. one row's scale expanded over its tokens
        torch.ops.hotswap.lora_apply(y, x, a_slots, b_slots, token_slots, ranks, token_scales)
        return
    t = torch.empty(x.shape[0], a_slots.shape[1], device=x.device, dtype=torch.float32)  # [N, R]
    lora_shrink(t, x, a_slots, token_slots, ranks, backend=path, plan=plan)
    if token_scales is not None:
        t.mul_(token_scales.view(-1, 1))
    lora_expand(y, t, b_slots, token_slots, ranks, backend=path, plan=plan)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_first: bool, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last axis of x [..., D] with weight [D], in x's dtype: the mean of squares
    in fp32, x times its reciprocal root rounded to x's dtype and then times the weight
    (transformers' Llama) or, with weight_first, times the weight before the one rounding."""
    if _use_native(x, backend) and x.stride(-1) == 1 and x.dim() >= 1:
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(x2)
        torch.ops.hotswap.rms_norm(out, x2, weight.contiguous(), float(eps), bool(weight_first))
        return out.view(x.shape)
    return reference.rms_norm(x, weight, eps, weight_first)



def row_max(x: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum [B] (float32) and the index of its first occurrence [B] (int64) of x [B, V] (fp32, bf16
    or fp16): torch.max(x, dim=-1), NaN included (a row holding a NaN answers that NaN at its first index). One
    native pass on CPU rows."""
    if _use_native(x, backend) and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.dim() == 2 \
            and x.shape[1] > 0 and x.stride(1) == 1:
        values = torch.empty(x.shape[0], dtype=torch.float32)
        indices = torch.empty(x.shape[0], dtype=torch.int64)
        torch.ops.hotswap.row_max(values, indices, x)
        return values, indices
    return reference.row_max(x)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
           backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding as transformers' apply_rotary_pos_emb (unsqueeze_dim=1) computes it:
    (q * cos + rotate_half(q) * sin, the same for k), each product and the sum rounded to the dtype as
    the eager ops round, so bf16 / fp16 results are bit-equal to theirs. q [B, H, T, D], k [B, KVH, T, D]
    (any batch / head / token strides: the outputs keep them); cos, sin [B or 1, T, D]. Natively one
    pass over both."""
    B, _, T, D = q.shape
    if _use_native(q, backend) and k.dim() == 4 and k.shape[0] == B and k.shape[2] == T and k.shape[3] == D \
            and cos.dim() == 3 and cos.shape[0] in (1, B) and cos.shape[1:] == (T, D) and sin.shape == cos.shape \
            and q.dtype == k.dtype == cos.dtype == sin.dtype and D % 2 == 0 \
            and q.stride(-1) == k.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1:
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        torch.ops.hotswap.rotary(q_out, k_out, q, k, cos.expand(B, T, D), sin.expand(B, T, D))
        return q_out, k_out
    return reference.rotary(q, k, cos, sin)


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, *,
             backend: str | None = None) -> None:
    """key / value [tokens, kv_heads, head_dim] (token and head axes may be strided) into cache slots [tokens]
    (int64) of k_cache / v_cache [blocks, block_size, kv_heads, head_dim]; slot s is block s // block_size,
    offset s % block_size. Natively one byte copy per token and head."""
    if _use_native(k_cache, backend) and key.dtype == value.dtype == k_cache.dtype == v_cache.dtype \
            and key.stride(-1) == 1 and value.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous():
        torch.ops.hotswap.kv_write(k_cache, v_cache, key, value, slots)
    else:
        reference.kv_write(k_cache, v_cache, key, value, slots)
