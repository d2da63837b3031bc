"""Plain result types of the SDK: no protobuf objects leak into the public API."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)
    """(token_id, token, logprob) of the most likely alternatives, best first."""


@dataclass
class Timing:
    queue_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    """"length", "stop", "eos" or "cancelled"."""
    prompt_tokens: int
    generated_tokens: int
    timing: Timing
    request_id: str
    adapter_id: str
    """The adapter that served it, with its version ("name@3"); "" for the base model."""
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class StreamChunk:
    """New text since the previous chunk. The last chunk has finish_reason, usage and timing."""

    text: str
    token_ids: list[int]
    request_id: str
    adapter_id: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    timing: Timing | None = None


@dataclass
class Adapter:
    id: str
    name: str
    version: int
    peft_type: str
    rank: int
    target_modules: list[str]
    num_virtual_tokens: int
    size_bytes: int
    base_fingerprint: str
    created_at: datetime
    source_uri: str
    residency: str
    """"registered" (files only), "host" or "device"."""
    pinned: bool
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelInfo:
    source: str
    model_type: str
    quantization: str
    dtype: str
    device: str
    fingerprint: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    has_chat_template: bool
    max_seq_len: int
    max_batch_size: int
    max_lora_rank: int
    adapter_types: list[str]


@dataclass
class Tokens:
    token_ids: list[int]
    tokens: list[str]
