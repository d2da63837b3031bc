"""The engine: one step = schedule → execute → update.

`Engine` is single-threaded and owns the model (through its runner), the paged
KV cache and the scheduler. `loop.EngineLoop` runs it on its own thread."""
from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Callable

import torch

from ..config import EngineConfig
from ..errors import Cancelled, HotswapError, InvalidArgument, ResourceExhausted
from .detokenize import IncrementalDetokenizer, StopMatcher
from .kv_blocks import KVBlockManager
from .request import FinishReason, GenerateRequest, StreamEvent, TokenLogprob
from .row import Row
from .runner import ModelRunner
from .sampling import apply_repetition_penalty, sample_step
from .scheduler import ScheduledRow, Scheduler, SchedulerOutput

if TYPE_CHECKING:
    from ..adapters.cache import AdapterCache
    from ..model.loader import LoadedModel

MAX_CHARS_PER_TOKEN = 32
"""A prompt longer than max_seq_len × this many characters is refused untokenised."""
POOL_OVERCOMMIT = 2
"""Blocks beyond what a full batch of max-length rows needs only feed the prefix cache:
the pool is capped at this many times that."""


class Engine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig | None = None, adapters: AdapterCache | None = None) -> None:
        self.cfg = cfg or EngineConfig()
        self.tokenizer = loaded.tokenizer
        self.adapters = adapters
        self.runner = ModelRunner(loaded, self.cfg)
        self.max_seq_len = self.cfg.max_seq_len or self.runner.context_length or 4096
        per_row = -(-self.max_seq_len // self.cfg.block_size)
        # The adapter cache's device tier and the LoRA slots copying from it come later: keep room for both.
        reserved = 2 * adapters.cfg.device_bytes if adapters is not None else 0
        num_blocks = self.runner.allocate_cache(self.cfg.kv_cache_bytes, POOL_OVERCOMMIT * self.cfg.max_batch_size * per_row, reserved)
        self.kv = KVBlockManager(num_blocks, self.cfg.block_size, self.cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.cfg, self.kv, self.max_seq_len, adapters)
        self.eos_ids = _eos_ids(loaded)
        self.vocab_size = self.runner.head.out_features
        self.rng = torch.Generator(device=self.runner.device).manual_seed(secrets.randbits(63))
        """Draws for rows without a seed; the process-wide RNG is never touched."""
        self.outbox: list[tuple[Row, StreamEvent]] = []
        """Events of the current step, delivered by the loop once the step is over."""

    # -- intake ----------------------------------------------------------------
    def tokenize(self, req: GenerateRequest) -> list[int]:
        self._check_text_size(req)
        if req.prompt_ids is not None:
            ids = list(req.prompt_ids)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidArgument(f"token ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}", field="prompt_ids")
        elif req.messages is not None:
            if not self.tokenizer.chat_template:
                raise InvalidArgument("this model has no chat template; send a plain prompt", field="messages")
            text = self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(req.prompt)["input_ids"]
        if not ids:
            raise InvalidArgument("the prompt is empty", field="prompt")
        total = len(ids) + req.params.max_new_tokens
        if len(ids) >= self.max_seq_len:
            raise InvalidArgument(f"the prompt has {len(ids)} tokens; max_seq_len {self.max_seq_len} leaves no room for a new token",
                                  field="prompt_ids" if req.prompt_ids is not None else "messages" if req.messages is not None else "prompt")
        if total > self.max_seq_len:
            raise InvalidArgument(f"{len(ids)} prompt tokens + {req.params.max_new_tokens} new tokens exceed max_seq_len {self.max_seq_len}: "
                                  f"ask for at most {self.max_seq_len - len(ids)} new tokens", field="max_new_tokens")
        if self.kv.blocks_for(total) > self.kv.num_blocks:
            raise ResourceExhausted(f"{total} positions need {self.kv.blocks_for(total)} KV blocks; the whole KV cache holds "
                                    f"{self.kv.num_blocks} (raise kv_cache_mb, or lower max_new_tokens)", field="max_new_tokens")
        return ids

    def _check_text_size(self, req: GenerateRequest) -> None:
        """Refuse text that cannot fit before spending time tokenising it: no token of a
        real tokenizer covers more than MAX_CHARS_PER_TOKEN characters of ordinary text."""
        limit = self.max_seq_len * MAX_CHARS_PER_TOKEN
        if req.prompt_ids is not None:
            size, field = len(req.prompt_ids), "prompt_ids"
            limit = self.max_seq_len
        elif req.messages is not None:
            size, field = sum(len(str(m.get("content") or "")) for m in req.messages), "messages"
        else:
            size, field = len(req.prompt or ""), "prompt"
        if size > limit:
            unit = "token ids" if field == "prompt_ids" else "characters"
            raise InvalidArgument(f"{size} {unit} cannot fit in max_seq_len {self.max_seq_len} (at most {limit} {unit})", field=field)

    def make_row(self, req: GenerateRequest, sink: Callable[[StreamEvent], None]) -> Row:
        ids = self.tokenize(req)
        gen = None
        if req.params.temperature > 0 and req.params.seed is not None:
            gen = torch.Generator(device=self.runner.device).manual_seed(req.params.seed)
        return Row(req, ids, sink, IncrementalDetokenizer(self.tokenizer, ids), StopMatcher(list(req.params.stop)), generator=gen)

    def add_row(self, row: Row) -> None:
        self.scheduler.add(row)

    def abort(self, key: int) -> bool:
        row = self.scheduler.remove_waiting(key)
        if row is not None:
            self._finish(row, FinishReason.CANCELLED, Cancelled("cancelled by the client"))
            return True
        for row in self.scheduler.running:
            if row.key == key:
                row.cancelled = True
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # -- the step ----------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> SchedulerOutput:
        for row in [r for r in self.scheduler.running if r.cancelled]:
            self._finish(row, FinishReason.CANCELLED, Cancelled("cancelled by the client"))
        start = time.perf_counter()
        out = self.scheduler.schedule()
        for row, error in out.failed:
            self._finish(row, FinishReason.ERROR, error)
        logits = self._execute(out)
        self._update(out, logits)
        if out.scheduled:
            self.scheduler.observe(out, time.perf_counter() - start)
        return out

    def _execute(self, out: SchedulerOutput) -> torch.Tensor | None:
        """One packed forward → logits [rows that sample, vocab]. A LoRA slot that fails to
        load, or a forward that raises, costs only the rows it concerns (NaN logits)."""
        if not out.scheduled:
            return None
        for slot, weights in out.lora_loads:
            try:
                self.runner.load_lora(slot, weights)
            except Exception as e:  # noqa: BLE001 - e.g. a corrupted device copy of the adapter
                self.scheduler.lora_slots.invalidate(slot)
                for s in out.scheduled:
                    if s.row.lora_slot == slot:
                        s.row.error = HotswapError(f"loading the adapter's LoRA weights failed: {type(e).__name__}: {e}")
        good = [s for s in out.scheduled if s.row.error is None]
        if len(good) == len(out.scheduled):
            return self._guarded(good)
        logits = torch.full((sum(s.samples for s in out.scheduled), self.vocab_size), float("nan"), device=self.runner.device)
        at = [i for i, s in enumerate(s for s in out.scheduled if s.samples) if s.row.error is None]
        if good:
            logits[torch.tensor(at, dtype=torch.long, device=logits.device)] = self._guarded(good)
        return logits

    def _guarded(self, scheduled: list[ScheduledRow]) -> torch.Tensor:
        try:
            return self.runner.execute(scheduled)
        except Exception as e:  # noqa: BLE001 - isolate the failing row(s)
            if len(scheduled) > 1:
                return torch.cat([self._guarded([s]) for s in scheduled])
            row = scheduled[0].row
            if isinstance(e, torch.OutOfMemoryError):  # the batch was retried row by row: this row alone does not fit
                row.error = ResourceExhausted(f"out of device memory running this request: {e}", field="prompt")
            else:
                row.error = HotswapError(f"request failed in the model forward: {type(e).__name__}: {e}")
            return torch.full((int(scheduled[0].samples), self.vocab_size), float("nan"), device=self.runner.device)

    def _update(self, out: SchedulerOutput, logits: torch.Tensor | None) -> None:
        sampling: list[Row] = []
        for s in out.scheduled:
            s.row.num_computed = s.end
            if s.row.error is None:  # a failed forward may have left garbage in the row's blocks
                self.kv.commit(s.row)
            if s.samples:
                sampling.append(s.row)
        if sampling:
            result = self._sample(sampling, logits[:, : self.vocab_size])
            now = time.monotonic()
            for i, row in enumerate(sampling):
                if row.error is not None or not result.finite[i]:
                    self._finish(row, FinishReason.ERROR, row.error or HotswapError("the model produced non-finite logits for this request"))
                    continue
                tok = result.tokens[i]
                row.output_ids.append(tok)
                row.first_token_at = row.first_token_at or now
                lps = []
                if row.request.params.logprobs is not None:
                    lps = [TokenLogprob(tok, result.logprobs[i], result.top[i][: row.request.params.logprobs] if result.top else [])]
                    row.logprobs.extend(lps)
                self._advance(row, tok, lps)
        for s in out.scheduled:  # a row that failed mid-prompt (no logits this step) ends too
            if s.row.error is not None and s.row.finish_reason is None:
                self._finish(s.row, FinishReason.ERROR, s.row.error)

    def _sample(self, rows: list[Row], logits: torch.Tensor):
        params = [r.request.params for r in rows]
        penalized = self._penalize(rows, logits) if any(p.repetition_penalty != 1.0 for p in params) else None
        want = [p.logprobs for p in params if p.logprobs is not None]
        return sample_step(logits, [p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params],
                           [r.generator for r in rows], self.rng, bool(want), max(want, default=0), penalized)

    def _advance(self, row: Row, tok: int, lps: list[TokenLogprob]) -> None:
        p = row.request.params
        if tok in self.eos_ids and not p.ignore_eos:
            self._finish(row, FinishReason.EOS, None, [tok], lps, row.stop.push(row.detok.flush())[0] + row.stop.flush())
            return
        text, stopped = row.stop.push(row.detok.push(tok))
        if stopped:
            self._finish(row, FinishReason.STOP, None, [tok], lps, text)
        elif len(row.output_ids) >= p.max_new_tokens:
            rest, _ = row.stop.push(row.detok.flush())
            self._finish(row, FinishReason.LENGTH, None, [tok], lps, text + rest + row.stop.flush())
        else:
            self.outbox.append((row, StreamEvent(row.request_id, [tok], text, lps)))

    def _penalize(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        seqs = [r.prompt_ids + r.output_ids for r in rows]
        width = max(len(s) for s in seqs)
        seen = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, s in enumerate(seqs):
            seen[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        pen = torch.tensor([r.request.params.repetition_penalty for r in rows])
        dev = logits.device
        return apply_repetition_penalty(logits, seen.to(dev), mask.to(dev), pen.to(dev))

    def _finish(self, row: Row, reason: FinishReason, error: Exception | None, token_ids: list[int] | None = None,
                lps: list[TokenLogprob] | None = None, text: str = "") -> None:
        """The row's last event; its blocks, LoRA slot and adapter reference go back."""
        if row.finish_reason is not None:
            return
        row.finish_reason = reason
        row.finished_at = time.monotonic()
        self.scheduler.finish(row)
        if row.adapter is not None and self.adapters is not None:
            for adapter_id in row.adapter_ids:
                self.adapters.release(adapter_id)
        self.outbox.append((row, StreamEvent(row.request_id, token_ids or [], text, lps or [], reason, error)))

    def fail_all(self, error: HotswapError, reason: FinishReason = FinishReason.ERROR) -> None:
        """End every waiting and running row (an engine bug, or shutdown)."""
        for row in list(self.scheduler.waiting) + list(self.scheduler.running):
            self._finish(row, reason, error)
        self.scheduler.waiting.clear()

    def take_events(self) -> list[tuple[Row, StreamEvent]]:
        events, self.outbox = self.outbox, []
        return events


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids = set()
    gen = getattr(loaded.model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids
