"""Kernels for the packed engine step: paged attention, per-token LoRA, the
layers' RMSNorm and cache writes, and the row maximum that gives greedy tokens.

Each op runs the native C++ kernel (csrc/, built on first use for this machine)
on CPU tensors, the Triton kernel (`triton_ops`: paged attention and LoRA) on CUDA
tensors, and falls back to the pure-torch `reference` everywhere else.
"""
from . import native, reference
from .lora_plan import LoraPlan, lora_plan
from .ops import (
    BACKENDS,
    get_backend,
    kv_write,
    lora_apply,
    lora_expand,
    lora_shrink,
    native_available,
    native_unavailable_reason,
    paged_attention,
    rms_norm,
    rotary,
    row_max,
    set_backend,
    triton_available,
    triton_unavailable_reason,
)

load = native.load

__all__ = [
    "BACKENDS",
    "get_backend",
    "kv_write",
    "load",
    "LoraPlan",
    "lora_apply",
    "lora_expand",
    "lora_plan",
    "lora_shrink",
    "native",
    "native_available",
    "native_unavailable_reason",
    "paged_attention",
    "reference",
    "rms_norm",
    "rotary",
    "row_max",
    "set_backend",
    "triton_available",
    "triton_unavailable_reason",
]
