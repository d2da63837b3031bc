"""Which device and dtype to run on, when the configuration says "auto"."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast on CPUs with AMX or AVX512-BF16 and very slow without:
    on an AVX2-only EPYC we measured 0.3 GFLOP/s bf16 against 146 GFLOP/s fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def choose_quantization(requested: str, device: torch.device) -> tuple[str, str]:
    """(quantization, why) for --quantization, where "auto" is the product's promise: one
    4-bit base on the GPU; on CPU bitsandbytes' 4-bit kernels are slower than plain bf16/fp32."""
    if requested != "auto":
        return requested, "set with --quantization"
    if device.type == "cuda":
        return "nf4", "auto: CUDA is present; a 4-bit base leaves the GPU's memory to the KV cache and adapters"
    return "none", "auto: no CUDA device, and bitsandbytes' 4-bit kernels are slow on CPU; --quantization nf4 to use them anyway"
