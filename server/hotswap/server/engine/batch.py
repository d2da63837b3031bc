"""Per-request state on the engine thread, and the running batch (rows in slot order)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..adapters.weights import Adapter, LoraWeights, PrefixWeights, PromptWeights
from .detokenize import IncrementalDetokenizer, StopMatcher
from .request import FinishReason, GenerateRequest, StreamEvent, TokenLogprob


@dataclass
class Row:
    request: GenerateRequest
    prompt_ids: list[int]
    sink: Callable[[StreamEvent], None]
    detok: IncrementalDetokenizer
    stop: StopMatcher
    adapter: Adapter | None = None
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    length: int = 0
    """KV positions written for this row (prefix + virtual tokens + prompt + fed outputs)."""
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: "FinishReason | None" = None
    error: Exception | None = None
    cancelled: bool = False
    """Set from any thread by cancel(); the engine retires the row at its next step."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def lora(self) -> LoraWeights | None:
        return self.adapter.weights if self.adapter and isinstance(self.adapter.weights, LoraWeights) else None

    @property
    def prompt_embeddings(self) -> torch.Tensor | None:
        w = self.adapter.weights if self.adapter else None
        return w.embeddings if isinstance(w, PromptWeights) else None

    @property
    def prefix(self) -> PrefixWeights | None:
        w = self.adapter.weights if self.adapter else None
        return w if isinstance(w, PrefixWeights) else None

    @property
    def num_virtual_tokens(self) -> int:
        return self.adapter.num_virtual_tokens if self.adapter else 0

    @property
    def prefill_tokens(self) -> int:
        """Tokens this row's prefill forward computes (prefix key/values are copied, not computed)."""
        return len(self.prompt_ids) + (self.prompt_embeddings.shape[0] if self.prompt_embeddings is not None else 0)

    @property
    def seq_len_needed(self) -> int:
        return self.num_virtual_tokens + len(self.prompt_ids) + self.request.params.max_new_tokens

    def mark_admitted(self) -> None:
        self.admitted_at = time.monotonic()


class RunningBatch:
    """Rows in KV slot order: row i sits in slot i, so the runner takes plain views."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def concatenate(self, rows: list[Row]) -> None:
        self.rows.extend(rows)

    def filter(self, keep: Callable[[Row], bool], move: Callable[[int, int, int], None]) -> list[Row]:
        """Drop rows failing `keep`; the last rows move into the freed slots via move(src, dst, length).
        Returns the dropped rows."""
        dropped = []
        i = 0
        while i < len(self.rows):
            if keep(self.rows[i]):
                i += 1
                continue
            dropped.append(self.rows[i])
            last = len(self.rows) - 1
            if i != last:
                move(last, i, self.rows[last].length)
                self.rows[i] = self.rows[last]
            self.rows.pop()
        return dropped
