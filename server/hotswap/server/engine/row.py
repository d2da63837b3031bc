"""Per-request state on the engine thread.

A row's sequence is its adapter's virtual tokens (prompt or prefix tuning), then
the prompt, then the generated tokens; positions count from 0 over all of them.
`num_computed` of those positions have key/values in the paged cache; the
scheduler moves it forward in chunks, and a preempted row drops back to 0."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..adapters.weights import Adapter, AdaptionWeights, LoraWeights, PrefixWeights, PromptWeights, ScoreHead, TokenTables
from .detokenize import IncrementalDetokenizer, StopMatcher
from .request import FinishReason, GenerateRequest, StreamEvent, Task, TokenLogprob

_keys = itertools.count(1)


@dataclass(eq=False)
class Row:
    request: GenerateRequest
    prompt_ids: list[int]
    sink: Callable[[StreamEvent], None]
    detok: IncrementalDetokenizer
    stop: StopMatcher
    generator: torch.Generator | None = None
    """Seeded rows only: their own stream of random numbers, so batch mates never change their draws."""
    key: int = field(default_factory=lambda: next(_keys))
    """Unique per process: the engine's handle on the row (a client's request id may repeat)."""
    adapter: Adapter | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed: int = 0
    """Leading positions whose key/values are in the cache."""
    block_ids: list[int] = field(default_factory=list)
    """KV blocks holding positions 0.., block_size positions each."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of the row's leading full blocks (computed as their tokens become known)."""
    num_cached_blocks: int = 0
    """Leading blocks already offered to the prefix cache."""
    lora_slot: int = -1
    """Device LoRA slot while running with a LoRA adapter, else -1."""
    num_preemptions: int = 0
    bypassed: int = 0
    """Steps in which a later row got prompt work and this one, waiting or part-way through its prompt,
    got none (the scheduler's cache-aware and shortest-remaining orders; MAX_BYPASS puts it first)."""
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: FinishReason | None = None
    error: Exception | None = None
    cancelled: bool = False
    """Set from any thread by cancel(); the engine retires the row at its next step."""
    score_from: int = 0
    """SCORE rows: prompt_ids[score_from:] is the scored continuation."""
    scored: list[tuple[float, bool] | None] = field(default_factory=list)
    """SCORE rows: (log-prob, is the argmax) of each continuation token, filled as chunks are computed
    (indexed by token, so a preempted row's recomputation overwrites rather than appends)."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def adapter_ids(self) -> list[str]:
        """The versioned adapters the row holds a reference to: its one adapter, or every adapter it combines."""
        if self.request.adapters is not None:
            return [a for a, _ in self.request.adapters]
        return [self.request.adapter_id] if self.request.adapter_id else []

    @property
    def lora_key(self) -> str:
        """What the row's LoRA slot holds: the versioned adapter id, or its weighted combination."""
        if self.request.adapters is not None:
            return "combine(" + ",".join(f"{a}*{w!r}" for a, w in self.request.adapters) + ")"
        return self.request.adapter_id

    @property
    def adapter_key(self) -> str:
        """What the row's key/values depend on besides its tokens: the versioned adapter id ("" = base),
        or its combination, and the request's LoRA scale."""
        scale = self.request.lora_scale
        return self.lora_key if scale == 1.0 else f"{self.lora_key}*scale={scale!r}"

    @property
    def lora(self) -> LoraWeights | None:
        """The weights to put in a LoRA slot: None when the adapter changes no linear and no expert / router weight."""
        w = self.adapter.weights if self.adapter else None
        return w if isinstance(w, LoraWeights) and (w.modules or w.params) else None

    @property
    def token_tables(self) -> TokenTables | None:
        """The adapter's own embedding / output head changes, if any."""
        w = self.adapter.weights if self.adapter else None
        return w.tables if isinstance(w, LoraWeights) else None

    @property
    def prompt_embeddings(self) -> torch.Tensor | None:
        """[num_virtual, hidden] for prompt tuning / P-tuning rows."""
        w = self.adapter.weights if self.adapter else None
        return w.embeddings if isinstance(w, PromptWeights) else None

    @property
    def prefix(self) -> PrefixWeights | None:
        w = self.adapter.weights if self.adapter else None
        return w if isinstance(w, PrefixWeights) else None

    @property
    def score_head(self) -> ScoreHead | None:
        return self.adapter.score_head if self.adapter else None

    @property
    def generates(self) -> bool:
        return self.request.task is Task.GENERATE

    @property
    def first_scored(self) -> int:
        """SCORE rows: the position of the continuation's first token."""
        return self.num_virtual + self.score_from

    @property
    def compute_from(self) -> int:
        """The first position whose outputs the row reads, so never taken from the prefix cache: the
        last known one for generating and classifying rows, the one before the continuation for scoring."""
        if self.request.task is Task.SCORE:
            return self.first_scored - 1
        return self.num_tokens - 1

    @property
    def adaption(self) -> AdaptionWeights | None:
        w = self.adapter.weights if self.adapter else None
        return w if isinstance(w, AdaptionWeights) else None

    @property
    def num_virtual(self) -> int:
        return self.adapter.num_virtual_tokens if self.adapter else 0

    @property
    def num_tokens(self) -> int:
        """Positions in the sequence so far; the last one is fed at the next step."""
        return self.num_virtual + len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_len(self) -> int:
        """Positions the row can ever hold: virtual + prompt + every token it may generate."""
        return self.num_virtual + len(self.prompt_ids) + (self.request.params.max_new_tokens if self.generates else 0)

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions start..end-1; virtual position i reads as -1 - i, so the
        prefix cache can key virtual tokens without ever matching a real id."""
        nv, np_ = self.num_virtual, len(self.prompt_ids)
        out = [-1 - i for i in range(start, min(end, nv))]
        if end > nv and start < nv + np_:
            out += self.prompt_ids[max(start - nv, 0): end - nv]
        if end > nv + np_:
            out += self.output_ids[max(start - nv - np_, 0): end - nv - np_]
        return out

    def mark_admitted(self) -> None:
        self.admitted_at = self.admitted_at or time.monotonic()
