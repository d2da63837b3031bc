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


@dataclass
class TrainingJob:
    id: str
    adapter_name: str
    method: str
    """"lora", "qlora", "prompt_tuning", "p_tuning" or "prefix_tuning"."""
    state: str
    """"queued", "validating", "running", "succeeded", "failed" or "cancelled"."""
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    estimated_finish_at: datetime | None
    error_code: str
    error_message: str
    trained_tokens: int
    adapter_id: str
    """"name@version" once succeeded: usable in generate at once."""
    step: int
    total_steps: int

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")


@dataclass
class JobEvent:
    time: datetime
    kind: str
    """"state", "step", "eval", "checkpoint" or "warning"."""
    job: TrainingJob
    """The job as of this event."""
    state: str | None = None
    metrics: dict = field(default_factory=dict)
    """kind "step": step, total_steps, epoch, train_loss, learning_rate, tokens_per_second; kind "eval": step, eval_loss."""
    message: str = ""
    """kind "warning": the warning; kind "checkpoint": the checkpoint's name."""
