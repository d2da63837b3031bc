"""What callers hand the engine and what they get back. Plain data, no tensors."""
from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field

from ..errors import InvalidArgument, shown


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"


class Task(str, enum.Enum):
    GENERATE = "generate"
    CLASSIFY = "classify"
    """Prefill only: the adapter's score head reads the final hidden state of the prompt's last token."""
    SCORE = "score"
    """Prefill only: the log-probability of each token of `continuation` after the prompt."""


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""What torch.Generator.manual_seed accepts; past it a row could not be created."""
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
"""Stop strings are matched against every row's new text on the engine thread: bounded, like OpenAI's 4."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    """Generated tokens at most (finish reason "length")."""
    temperature: float = 0.0
    """0 means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in the prompt or output (transformers' semantics); 1 is off."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation (finish reason "stop"); not included in the text."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    logprobs: int | None = None
    """None: no logprobs. 0: logprob of each sampled token. k>0: also the top-k alternatives."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
            (0 <= self.temperature < math.inf, "temperature", "must be a finite number >= 0"),
            (self.top_k >= 0, "top_k", "must be >= 0"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX, "seed", f"must be in [{SEED_MIN}, {SEED_MAX}]"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 < self.repetition_penalty < math.inf, "repetition_penalty", "must be a finite number > 0"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be between 0 and 20"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings"),
            (all(len(s) <= MAX_STOP_CHARS for s in self.stop), "stop", f"each stop string at most {MAX_STOP_CHARS} characters"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise InvalidArgument(f"{msg}, got {shown(getattr(self, name))}", field=name)


def check_message_count(count: int, max_seq_len: int) -> None:
    """Every turn a chat template renders costs tokens (its role markers) even with empty content:
    more turns than positions cannot fit. Cheap, so the front ends check it before they walk the
    turns one by one on the event loop (3 M empty turns, a 24 MB message, held every stream 2.7 s)."""
    if count > max_seq_len:
        raise InvalidArgument(f"{count} chat messages cannot fit in max_seq_len {max_seq_len} (each takes at least one token)",
                              field="messages")


_ids = itertools.count()
MAX_LORA_SCALE = 10.0
"""Per-request LoRA scale and combination weights stay within ±this: past it no trained adapter means anything."""
MAX_COMBINED = 8
"""Adapters one request may combine: each adds its rank to the combined slot."""


def check_lora_controls(scale: object, adapters: list | None, adapter_id: str) -> None:
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (number(scale) and 0 <= scale <= MAX_LORA_SCALE):
        raise InvalidArgument(f"must be a finite number in [0, {MAX_LORA_SCALE:g}], got {shown(scale)}", field="lora_scale")
    if adapters is None:
        if scale != 1.0 and not adapter_id:
            raise InvalidArgument("a LoRA scale needs an adapter (adapter_id or adapters)", field="lora_scale")
        return
    if adapter_id:
        raise InvalidArgument("give either adapter_id or adapters (a weighted combination), not both", field="adapters")
    if not 1 <= len(adapters) <= MAX_COMBINED:
        raise InvalidArgument(f"a combination takes 1 to {MAX_COMBINED} adapters, got {len(adapters)}", field="adapters")
    ids = [a for a, _ in adapters]
    for a, w in adapters:
        if not isinstance(a, str) or not a:
            raise InvalidArgument(f"each entry needs a non-empty adapter id, got {shown(a)}", field="adapters")
        if not (number(w) and abs(w) <= MAX_LORA_SCALE):
            raise InvalidArgument(f"weight of {shown(a)} must be a finite number in [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}], got {shown(w)}",
                                  field="adapters")
    if len(set(ids)) != len(ids):
        raise InvalidArgument("an adapter appears twice in the combination: give it once with the summed weight", field="adapters")


@dataclass
class GenerateRequest:
    """One request to the engine: a generation, or a prefill-only row (`task` CLASSIFY or SCORE)
    that shares the batch with generating rows and ends once its prompt is computed.
    Exactly one of prompt, messages, prompt_ids."""

    prompt: str | None = None
    messages: list[dict] | None = None
    """Chat messages ({"role", "content"}), rendered with the model's chat template."""
    prompt_ids: list[int] | None = None
    adapter_id: str = ""
    """Empty: the base model."""
    params: SamplingParams = field(default_factory=SamplingParams)
    lora_scale: float = 1.0
    """Multiplies the LoRA delta of the row's adapter (PEFT's `set_scale` semantics: scaling × this)."""
    adapters: list[tuple[str, float]] | None = None
    """Instead of adapter_id: LoRA adapters combined as Σ weight·ΔW (see `adapters.combine`)."""
    request_id: str = ""
    arrival_time: float = field(default_factory=time.monotonic)
    task: Task = Task.GENERATE
    continuation: str | list[int] | None = None
    """SCORE only: the text (or token ids) scored after the prompt. Tokenised on its own and appended
    to the prompt's tokens, as lm-evaluation-harness does for loglikelihood requests."""

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"req-{next(_ids)}"
        given = [x is not None for x in (self.prompt, self.messages, self.prompt_ids)]
        if sum(given) != 1:
            raise InvalidArgument("give exactly one of prompt, messages, prompt_ids", field="prompt")
        if (self.task is Task.SCORE) != (self.continuation is not None):
            raise InvalidArgument("a continuation is given with (and only with) a score request", field="continuation")
        check_lora_controls(self.lora_scale, self.adapters, self.adapter_id)

    @property
    def generates(self) -> bool:
        return self.task is Task.GENERATE


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    """(token_id, logprob) of the most likely alternatives, best first."""


@dataclass
class Classification:
    """A CLASSIFY row's answer: per label, in the score head's order."""

    labels: list[str]
    logits: list[float]
    probabilities: list[float]


@dataclass
class ContinuationScore:
    """A SCORE row's answer: the continuation's tokens and the log-probability of each given
    everything before it (natural log, no temperature)."""

    token_ids: list[int]
    logprobs: list[float]
    greedy: bool
    """Every token was the most likely one at its position (lm-evaluation-harness' is_greedy)."""

    @property
    def total(self) -> float:
        return sum(self.logprobs)


@dataclass
class StreamEvent:
    """One step's output for one request. The last event has finish_reason set."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    """Newly decoded text; held back while it may be an incomplete character or the start of a stop string."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: Exception | None = None
    readout: Classification | ContinuationScore | None = None
    """The last event of a CLASSIFY or SCORE row that succeeded."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerateResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[TokenLogprob]
    queue_time: float
    """Seconds from submit to admission into the batch."""
    time_to_first_token: float
    total_time: float
    error: Exception | None = None
    readout: Classification | ContinuationScore | None = None
    """CLASSIFY and SCORE requests: their answer."""
