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
BACKENDS = ("auto", "native", "triton", "torch")


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
    """Rows in the running batch at once (decoding, or part-way through a chunked prefill)."""
    max_tokens_per_step: int = 2048
    """Token budget of one step: one per decoding row, the rest for prefill chunks; longer prompts are spread over steps."""
    max_decode_slowdown: float = 2.5
    """While rows are decoding, a step that also carries prompt chunks may take at most this many times a
    decode-only step (chunks are sized from measured step times), so long prompts never stall decoding —
    unless more rows wait for their first token than decode (then prompts take the whole budget);
    0 = only max_tokens_per_step bounds the chunks."""
    max_queue: int = 1024
    """Requests waiting for a row; more are refused with RESOURCE_EXHAUSTED."""
    max_seq_len: int = 0
    """Longest row (virtual tokens + prompt + generated); 0 = the model's context length (max_position_embeddings)."""
    kv_cache_bytes: int = 0
    """Byte budget of the paged KV cache; 0 = automatic: on CUDA 85% of the memory free after loading the
    weights, on CPU 10% of physical RAM (see `kv_cache.default_kv_cache_bytes`)."""
    block_size: int = 16
    """Tokens per KV block: the unit of allocation and of prefix caching."""
    enable_prefix_caching: bool = True
    """Reuse full KV blocks across requests with the same adapter and the same leading tokens."""
    max_loras: int = 64
    """LoRA adapters usable in one batch (device slots); requests for more wait for a free slot. Slot memory,
    allocated as adapters arrive: max_loras × the highest rank loaded (rounded up to a power of two) × (in + out) of
    each targeted linear."""
    max_expert_loras: int = 4
    """Of the max_loras slots, how many may hold an adapter with LoRA on MoE expert or router weights
    (PEFT target_parameters): such a slot holds every expert's A and B, max_expert_loras × experts × rank × (in + out)
    of each targeted expert weight (~1 GiB a slot at rank 16 on a 128-expert, 48-layer model). Requests for more
    such adapters at once wait for one of these slots; other adapters use the rest first. On a MoE model the default
    CUDA KV budget leaves room for these tables at rank 16."""
    attention_backend: str = "auto"
    """"auto" (native kernels on CPU when they build, Triton on CUDA when it imports, else torch), "native",
    "triton" or "torch" (the reference path)."""
    prepack_linears: bool = True
    """bf16 on CPU: keep each linear's weight also in oneDNN's blocked layout (packed once, not per call;
    ~1.5x faster matmuls for about the linears' weight size in extra memory; engine/packed_linears.py)."""
    decode_graphs: bool = False
    """Decode-only steps run from fixed buffers padded to a bucket size (engine/static_decode.py), captured
    once per bucket as CUDA graphs and replayed on CUDA (on CPU the same buffers run eagerly). Off until
    measured on a GPU; one KV block more is kept as scratch for the padding."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens_per_step", "max_queue", "block_size", "max_loras", "max_expert_loras"):
            if getattr(self, name) <= 0:
                raise InvalidArgument("must be positive", field=name)
        if not (self.max_decode_slowdown == 0 or self.max_decode_slowdown > 1):
            raise InvalidArgument(f"must be 0 (off) or above 1, got {self.max_decode_slowdown}", field="max_decode_slowdown")
        for name in ("max_seq_len", "kv_cache_bytes"):
            if getattr(self, name) < 0:
                raise InvalidArgument("must be >= 0 (0 = automatic)", field=name)
        if self.max_tokens_per_step < self.max_batch_size:
            raise InvalidArgument(
                f"max_tokens_per_step ({self.max_tokens_per_step}) must be at least max_batch_size "
                f"({self.max_batch_size}): every decoding row needs one token per step",
                field="max_tokens_per_step",
            )
        if self.attention_backend not in BACKENDS:
            raise InvalidArgument(f"must be one of {BACKENDS}, got {self.attention_backend!r}", field="attention_backend")
