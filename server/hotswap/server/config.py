"""Typed configuration. Every field has a default and a one-line docstring and
is validated at construction; nothing here reads the environment."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidArgument

QUANTIZATIONS = ("none", "nf4", "int8")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEFAULT_MODEL = "default"


def _default_cache_dir() -> Path:
    # Evaluated when a config is built, never at import time.
    return Path(os.path.expanduser("~/.cache/hotswap"))


@dataclass
class ModelConfig:
    source: str = DEFAULT_MODEL
    """A local HF folder, a hub id (served from the local HF cache), a .gguf file, or "default" (SmolLM2-135M-Instruct)."""
    quantization: str = "none"
    """"none", "nf4" (bitsandbytes 4-bit) or "int8" (bitsandbytes LLM.int8)."""
    double_quant: bool = True
    """nf4 only: also quantize the quantization constants (QLoRA's double quantization)."""
    dtype: str = "auto"
    """Weights dtype for quantization "none", compute dtype for nf4/int8. "auto": bf16 on CUDA and on
    CPUs with AMX/AVX512-BF16, else fp32 (bf16 is ~500x slower than fp32 on an AVX2-only CPU)."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda[:N]"."""
    cache_dir: Path = field(default_factory=_default_cache_dir)
    """Where GGUF sources are converted once to a safetensors checkpoint."""

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise InvalidArgument(f"must be one of {QUANTIZATIONS}, got {self.quantization!r}", field="quantization")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"must be one of {DTYPES}, got {self.dtype!r}", field="dtype")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise InvalidArgument(f"must be auto, cpu or cuda[:N], got {self.device!r}", field="device")
        self.cache_dir = Path(self.cache_dir)


@dataclass
class AdapterCacheConfig:
    device_bytes: int = 512 * 2**20
    """Byte budget of adapters held on the device (usable in a batch)."""
    host_bytes: int = 2 * 2**30
    """Byte budget of adapters held in host RAM (one copy away from the device)."""
    max_lora_rank: int = 64
    """Adapters of a higher LoRA rank are refused at load."""

    def __post_init__(self) -> None:
        if self.device_bytes <= 0 or self.host_bytes <= 0:
            raise InvalidArgument("byte budgets must be positive", field="adapter_cache")
        if self.max_lora_rank <= 0:
            raise InvalidArgument("must be positive", field="max_lora_rank")


@dataclass
class EngineConfig:
    max_batch_size: int = 64
    """Rows decoded together in one step."""
    max_tokens_per_step: int = 4096
    """Token budget of one step: prompt tokens prefilled plus one per decoding row."""
    max_queue: int = 1024
    """Requests waiting for a row; more are refused with RESOURCE_EXHAUSTED."""
    max_seq_len: int = 4096
    """Longest row (virtual tokens + prompt + generated); longer prompts are refused."""
    lora_gather_threshold: int = 4
    """Above this many distinct LoRA adapters in a batch, LoRA uses one batched gather-matmul instead of a loop per adapter."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens_per_step", "max_queue", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise InvalidArgument("must be positive", field=name)
        if self.max_tokens_per_step < self.max_batch_size:
            raise InvalidArgument(
                f"max_tokens_per_step ({self.max_tokens_per_step}) must be at least max_batch_size "
                f"({self.max_batch_size}): every decoding row needs one token per step",
                field="max_tokens_per_step",
            )
