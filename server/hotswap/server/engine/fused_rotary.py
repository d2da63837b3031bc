"""transformers' rotary embedding (`apply_rotary_pos_emb`) in one native call per layer
(kernels.rotary) inside the engine's forward, in bf16 / fp16 on CPU.

Eager code runs ten small ops per layer for it (slices, a negation, a cat, products
and sums for q and k): ~3.3 ms of a 45 ms decode step of 64 rows on the default
model, where the kernel takes ~0.8 ms (`bench/profile_step.py`, bench/RESULTS.md).

Attention modules call the rotary function of their own modeling module by its
global name, so that global is replaced, once per modeling module, by a dispatcher
that runs the kernel only when
- the calling thread is inside an engine forward (`engaged()`): transformers' own
  generate, the tuner and anything else in the process run the original;
- the original was verified, for this dtype and head_dim, to give the kernel's
  result bit for bit on random q, k, cos and sin (a function of that name computing
  anything else — interleaved pairs, partial rotary — never takes the kernel);
- the call has the plain form `(q, k, cos, sin)` (or unsqueeze_dim=1) with cos as
  wide as the heads, on CPU without autograd.
Any other call runs the original. The fp32 path (the fidelity reference) is never fused.
"""
from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import kernels

NAME = "apply_rotary_pos_emb"
DTYPES = (torch.bfloat16, torch.float16)
_local = threading.local()


@contextmanager
def engaged() -> Iterator[None]:
    """Rotary calls on this thread take the kernel (where verified) until the block ends."""
    before = getattr(_local, "on", False)
    _local.on = True
    try:
        yield
    finally:
        _local.on = before


class _Dispatch:
    """Stands in for one modeling module's apply_rotary_pos_emb."""

    def __init__(self, own) -> None:
        self.own = own
        self.verified: dict[tuple[torch.dtype, int], bool] = {}
        """(dtype, head_dim) -> whether `own` gives the kernel's result there (checked once)."""

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        if getattr(_local, "on", False) and not args and (not kwargs or kwargs == {"unsqueeze_dim": 1}) \
                and isinstance(q, torch.Tensor) and q.dim() == 4 and self.verified.get((q.dtype, q.shape[-1]), False) \
                and isinstance(cos, torch.Tensor) and cos.dim() == 3 and cos.shape[-1] == q.shape[-1] \
                and q.device.type == "cpu" and not torch.is_grad_enabled():
            return kernels.rotary(q, k, cos, sin, backend="native")
        return self.own(q, k, cos, sin, *args, **kwargs)

    @torch.no_grad()
    def verify(self, dtype: torch.dtype, head_dim: int) -> bool:
        key = (dtype, head_dim)
        if key not in self.verified:
            self.verified[key] = _same_as_kernel(self.own, dtype, head_dim)
        return self.verified[key]


def _same_as_kernel(own, dtype: torch.dtype, head_dim: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    tokens = 7
    # [B, T, H, D] transposed to [B, H, T, D], as attention modules hand them over.
    q = (torch.randn(1, tokens, 4, head_dim, generator=gen) * 3).to(dtype).transpose(1, 2)
    k = (torch.randn(1, tokens, 2, head_dim, generator=gen) * 3).to(dtype).transpose(1, 2)
    angles = torch.rand(1, tokens, head_dim, generator=gen) * 50
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    try:
        want = own(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - a function that cannot take the plain form is not one we replace
        return False
    if not (isinstance(want, tuple) and len(want) == 2 and all(isinstance(t, torch.Tensor) for t in want)):
        return False
    got = kernels.rotary(q, k, cos, sin, backend="native")
    return all(w.shape == g.shape and w.dtype == g.dtype and torch.equal(w, g) for w, g in zip(want, got))


def _rotary_namespaces(model: nn.Module) -> list[dict]:
    """The global namespaces whose `apply_rotary_pos_emb` the model's modules call from forward."""
    seen: dict[int, dict] = {}
    for m in model.modules():
        forward = inspect.unwrap(type(m).forward)
        code = getattr(forward, "__code__", None)
        if code is not None and NAME in code.co_names and callable(forward.__globals__.get(NAME)):
            seen[id(forward.__globals__)] = forward.__globals__
    return list(seen.values())


def fuse_rotary(model: nn.Module, device: torch.device, dtype: torch.dtype, head_dim: int) -> int:
    """Route the model's rotary calls through the kernel inside `engaged()` where verified (bf16 / fp16 on
    CPU, the native kernels built); returns how many modeling modules' rotary functions take it."""
    if device.type != "cpu" or dtype not in DTYPES or not kernels.native_available():
        return 0
    fused = 0
    for namespace in _rotary_namespaces(model):
        dispatch = namespace[NAME]
        if not isinstance(dispatch, _Dispatch):
            dispatch = namespace[NAME] = _Dispatch(dispatch)
        fused += dispatch.verify(dtype, head_dim)
    return fused
