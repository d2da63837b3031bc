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
    """The adapter that served it, with its version ("name@3"); "" for the base model and a combination."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    adapters: list[tuple[str, float]] = field(default_factory=list)
    """A weighted combination's members, versioned: [("name@3", 0.7), ...]."""


@dataclass
class StreamChunk:
    """New text since the previous chunk. The last chunk has finish_reason, usage and timing."""

    text: str
    token_ids: list[int]
    request_id: str
    adapter_id: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    adapters: list[tuple[str, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    timing: Timing | None = None


@dataclass
class Classification:
    """Classify's answer: one entry per label, in the adapter's label order."""

    labels: list[str]
    logits: list[float]
    probabilities: list[float]
    label: str
    """The most likely label."""
    prompt_tokens: int
    timing: Timing
    request_id: str
    adapter_id: str


@dataclass
class CandidateScore:
    text: str
    logprob: float
    """Total log-likelihood of the candidate given the prompt (natural log)."""
    token_ids: list[int]
    tokens: list[str]
    token_logprobs: list[float]
    is_greedy: bool
    """Greedy decoding from the prompt would produce exactly these tokens."""


@dataclass
class Scores:
    """Score's answer: `candidates` in the order given; `best` has the highest total log-likelihood."""

    candidates: list[CandidateScore]
    prompt_tokens: int
    timing: Timing
    request_id: str
    adapter_id: str

    @property
    def best(self) -> CandidateScore:
        return max(self.candidates, key=lambda c: c.logprob)


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
    quantization_reason: str = ""
    """Set by the operator, or chosen by the server (nf4 with CUDA, none on CPU) and why."""


@dataclass
class Tokens:
    token_ids: list[int]
    tokens: list[str]


@dataclass
class TrainingPlan:
    """What a job trains with, decided when it starts running."""

    hyperparameters: dict
    """Every value used: lora_r, learning_rate, epochs, batch_size, base_protection, ..."""
    automatic: list[str]
    """Names of the values the tuner chose (the rest were given)."""
    train_examples: int
    validation_examples: int
    validation_held_out: bool
    """The validation examples were held out of the training data."""
    replay_examples: int
    """Rows of the base's own answers to general prompts trained on beside the data."""
    steps_per_epoch: int


@dataclass
class SampleGeneration:
    kind: str
    """"validation", "train" (no validation set) or "control" (a general prompt nothing was trained on)."""
    prompt: str
    reference: str
    """The example's expected answer (validation / train)."""
    before: str
    """The base model's answer."""
    after: str
    """The new adapter's answer ("" before training)."""


@dataclass
class LabelMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int
    """Examples of this label."""


@dataclass
class ClassificationReport:
    """A classifier's registered checkpoint, measured on the validation set (or the training set without one)."""

    split: str
    """"validation" or "train"."""
    label_names: list[str]
    accuracy: float
    precision: float
    recall: float
    f1: float
    """precision, recall, f1: macro averages over the labels."""
    per_label: list[LabelMetrics] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    """confusion[true label][predicted label]: example counts."""


@dataclass
class QualityReport:
    """What a finished job's adapter learned and what it changed elsewhere."""

    train_loss: float
    eval_loss: float | None
    control_changed: float
    """Share of the control prompts whose answer changed (its first 16 tokens differ from the base's)."""
    control_agreement: float
    """Teacher-forced on the base's control answers: share of positions where the adapter's top token is the base's."""
    control_prompts: int
    samples: list[SampleGeneration] = field(default_factory=list)
    classification: ClassificationReport | None = None
    """Classification jobs: accuracy, precision, recall, F1 and the confusion matrix."""


@dataclass
class TrainingJob:
    id: str
    adapter_name: str
    method: str
    """"lora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning" or "classification"."""
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
    plan: TrainingPlan | None = None
    """Set once the job runs."""
    quality: QualityReport | None = None
    """Set once the job succeeded."""

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")


@dataclass
class JobEvent:
    time: datetime
    kind: str
    """"state", "step", "eval", "checkpoint", "warning", "samples" or "report"."""
    job: TrainingJob
    """The job as of this event."""
    state: str | None = None
    metrics: dict = field(default_factory=dict)
    """kind "step": step, total_steps, epoch, train_loss, learning_rate, tokens_per_second; kind "eval": step, epoch, eval_loss
    (classification jobs also accuracy, precision, recall, f1: macro averages on the validation set)."""
    message: str = ""
    """kind "warning": the warning; kind "checkpoint": the checkpoint's name; kind "samples": "before" or "after"."""
    samples: list[SampleGeneration] = field(default_factory=list)
    """kind "samples": the sample generations of that stage."""
    report: QualityReport | None = None
    """kind "report": the finished job's quality report."""
