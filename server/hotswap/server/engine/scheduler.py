"""Admission: which waiting rows join the batch this step. Never touches tensors,
so it is tested without a model."""
from __future__ import annotations

from typing import TYPE_CHECKING

from collections import deque
from dataclasses import dataclass, field

from ..config import EngineConfig
from ..errors import HotswapError, InvalidArgument, NotFound
from .batch import Row, RunningBatch

if TYPE_CHECKING:
    from ..adapters.cache import AdapterCache



@dataclass
class SchedulerOutput:
    """What one engine step executes."""

    prefill: list[Row] = field(default_factory=list)
    """Admitted this step; they take the slots after the running rows, in this order."""
    decode: list[Row] = field(default_factory=list)
    """Rows already running; each takes one decode step (slots 0..len-1)."""
    failed: list[tuple[Row, HotswapError]] = field(default_factory=list)
    """Waiting rows that can never run (their adapter failed to load, or is too long with it)."""

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode or self.failed)


class Scheduler:
    def __init__(self, cfg: EngineConfig, adapters: AdapterCache | None) -> None:
        self.cfg = cfg
        self.adapters = adapters
        self.waiting: deque[Row] = deque()
        self.running = RunningBatch()

    def add(self, row: Row) -> None:
        self.waiting.append(row)

    def remove_waiting(self, request_id: str) -> Row | None:
        for row in self.waiting:
            if row.request_id == request_id:
                self.waiting.remove(row)
                return row
        return None

    def _resolve_adapter(self, row: Row) -> HotswapError | bool:
        """True when the row's adapter is on the device (or it needs none), False while
        it loads, or the error that makes the row unservable."""
        adapter_id = row.request.adapter_id
        if not adapter_id or row.adapter is not None:
            return True
        if self.adapters is None:
            return NotFound(f"unknown adapter {adapter_id!r}: this engine has no adapter store", field="adapter_id")
        try:
            row.adapter = self.adapters.acquire(adapter_id)
        except HotswapError as error:
            return error
        return row.adapter is not None

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(decode=list(self.running))
        free_rows = self.cfg.max_batch_size - len(self.running)
        budget = self.cfg.max_tokens_per_step - len(self.running)
        for row in list(self.waiting):
            if free_rows == 0:
                break
            ready = self._resolve_adapter(row)
            if isinstance(ready, HotswapError):
                self.waiting.remove(row)
                out.failed.append((row, ready))
                continue
            if not ready:
                continue  # its adapter is loading; rows behind it may still go
            if row.seq_len_needed > self.cfg.max_seq_len:
                self.waiting.remove(row)
                out.failed.append((row, InvalidArgument(
                    f"{row.num_virtual_tokens} virtual + {len(row.prompt_ids)} prompt + "
                    f"{row.request.params.max_new_tokens} new tokens exceed max_seq_len {self.cfg.max_seq_len}",
                    field="max_new_tokens")))
                continue
            if row.prefill_tokens > self.cfg.max_tokens_per_step:
                self.waiting.remove(row)
                out.failed.append((row, InvalidArgument(
                    f"{row.prefill_tokens} prompt tokens exceed max_tokens_per_step {self.cfg.max_tokens_per_step}",
                    field="prompt")))
                continue
            if row.prefill_tokens > budget:
                break  # first come, first served: later rows wait behind it
            self.waiting.remove(row)
            row.mark_admitted()
            out.prefill.append(row)
            free_rows -= 1
            budget -= row.prefill_tokens
        return out
