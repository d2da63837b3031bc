"""The engine: one step = schedule → execute → update.

`Engine` is single-threaded and owns the model (through its runner), the paged
KV cache and the scheduler. `loop.EngineLoop` runs it on its own thread."""
from __future__ import annotations

import math
import secrets
import time
from typing import TYPE_CHECKING, Callable

import torch

from ..config import EngineConfig
from ..errors import Cancelled, HotswapError, InvalidArgument, ResourceExhausted
from .detokenize import IncrementalDetokenizer, StopMatcher
from .host_memory import reuse_freed_memory
from .kv_blocks import KVBlockManager
from .readout import ForwardOutput
from .request import (Classification, ContinuationScore, FinishReason, GenerateRequest, StreamEvent, Task, TokenLogprob,
                      check_message_count)
from .row import Row
from .runner import ModelRunner
from .sampling import apply_repetition_penalty, sample_step
from .scheduler import ScheduledRow, Scheduler, SchedulerOutput

if TYPE_CHECKING:
    from ..adapters.cache import AdapterCache
    from ..model.loader import LoadedModel

MAX_CHARS_PER_TOKEN = 32
"""A prompt longer than max_seq_len × this many characters is refused untokenised."""
EXPERT_RESERVE_RANK = 16
"""The rank the default KV budget leaves room for in the expert / router LoRA slot tables (PEFT's LoRA ranks
are mostly 8-16; a higher one still loads where memory allows, else it is refused with RESOURCE_EXHAUSTED)."""
POOL_OVERCOMMIT = 2
"""Blocks beyond what a full batch of max-length rows needs only feed the prefix cache:
the pool is capped at this many times that."""


class Engine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig | None = None, adapters: AdapterCache | None = None) -> None:
        self.cfg = cfg or EngineConfig()
        self.tokenizer = loaded.tokenizer
        self.adapters = adapters
        self.runner = ModelRunner(loaded, self.cfg)
        if self.runner.device.type == "cpu":
            reuse_freed_memory()  # steps reuse their activations' pages instead of faulting them in again
        self.max_seq_len = self.cfg.max_seq_len or self.runner.context_length or 4096
        per_row = -(-self.max_seq_len // self.cfg.block_size)
        reserved = self.adapter_reservation()
        num_blocks = self.runner.allocate_cache(self.cfg.kv_cache_bytes, POOL_OVERCOMMIT * self.cfg.max_batch_size * per_row, reserved,
                                                self.cfg.max_batch_size, per_row)
        self.kv = KVBlockManager(num_blocks, self.cfg.block_size, self.cfg.enable_prefix_caching)
        # Rows may read blocks others write in the same step only where one forward runs them all
        # (each layer writes before it attends); the own-attention path runs rows one by one.
        self.scheduler = Scheduler(self.cfg, self.kv, self.max_seq_len, adapters, share_writes=self.runner.layout.paged)
        self.eos_ids = _eos_ids(loaded)
        self.pad_id = getattr(loaded.model.config.get_text_config(), "pad_token_id", None)
        """What transformers' sequence classifiers skip when they pool the last token."""
        self.vocab_size = self.runner.head.out_features
        self.rng = torch.Generator(device=self.runner.device).manual_seed(secrets.randbits(63))
        """Draws for rows without a seed; the process-wide RNG is never touched."""
        self.outbox: list[tuple[Row, StreamEvent]] = []
        """Events of the current step, delivered by the loop once the step is over."""

    def adapter_reservation(self) -> int:
        """Device bytes the adapters take after start, kept out of the default KV budget: the adapter cache's
        device tier and the LoRA slots copying from it, and on a MoE model the expert / router slot tables,
        which hold all max_expert_loras slots at once, at EXPERT_RESERVE_RANK (vLLM likewise sizes its
        LoRA buffers for max_loras × max_lora_rank before the KV cache)."""
        if self.adapters is None:
            return 0
        params = self.runner.lora.params
        experts = params.table_bytes(min(EXPERT_RESERVE_RANK, self.adapters.cfg.max_lora_rank)) if params is not None else 0
        return 2 * self.adapters.cfg.device_bytes + experts

    # -- intake ----------------------------------------------------------------
    def tokenize(self, req: GenerateRequest) -> list[int]:
        """The row's token ids (a SCORE row's prompt and continuation), checked to fit."""
        return self._tokens(req)[0]

    def prompt_tokens(self, req: GenerateRequest) -> list[int]:
        """The prompt's token ids alone (what a SCORE row's continuation is appended to)."""
        self._check_text_size(req)
        if req.task is Task.CLASSIFY and not req.adapter_id:
            raise InvalidArgument("Classify needs a sequence-classification adapter; the base model has no classification head", field="adapter_id")
        field = "prompt_ids" if req.prompt_ids is not None else "messages" if req.messages is not None else "prompt"
        if req.prompt_ids is not None:
            ids = self._check_ids(req.prompt_ids, "prompt_ids")
        elif req.messages is not None:
            if not self.tokenizer.chat_template:
                raise InvalidArgument("this model has no chat template; send a plain prompt", field="messages")
            # a classifier reads the conversation as it stands; generation and scoring continue it as the assistant
            text = self.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=req.task is not Task.CLASSIFY)
            # the template's markup counts as the prompt's text does
            self._check_fits(len(text), "characters", "messages", "the chat template renders the messages as ")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(req.prompt)["input_ids"]
        if req.task is Task.CLASSIFY and self.pad_id is not None:
            # transformers pools the last non-pad token; trailing pads cannot change a causal model's
            # state there, so dropping them makes that token the row's last
            end = len(ids)
            while end and ids[end - 1] == self.pad_id:
                end -= 1
            ids = ids[:end]
        if not ids:
            raise InvalidArgument("the prompt is empty" + (" (or only padding)" if req.task is Task.CLASSIFY else ""), field=field)
        return ids

    def _tokens(self, req: GenerateRequest) -> tuple[list[int], int]:
        """(token ids, where a SCORE row's continuation starts in them)."""
        ids = self.prompt_tokens(req)
        field = "prompt_ids" if req.prompt_ids is not None else "messages" if req.messages is not None else "prompt"
        score_from = len(ids)
        if req.task is Task.SCORE:
            cont = req.continuation
            more = self._check_ids(cont, "continuation") if isinstance(cont, list) else self.tokenizer(cont, add_special_tokens=False)["input_ids"]
            if not more:
                raise InvalidArgument("the continuation is empty", field="continuation")
            ids = ids + more
        if not req.generates:
            if req.task is Task.SCORE and score_from >= self.max_seq_len:
                raise InvalidArgument(f"the prompt has {score_from} tokens; max_seq_len {self.max_seq_len} leaves no room for a continuation", field=field)
            if len(ids) > self.max_seq_len:
                what = f"{score_from} prompt + {len(ids) - score_from} continuation tokens" if req.task is Task.SCORE else f"{len(ids)} tokens"
                raise InvalidArgument(f"{what} exceed max_seq_len {self.max_seq_len}", field="continuation" if req.task is Task.SCORE else field)
            if self.kv.blocks_for(len(ids)) > self.kv.num_blocks:
                raise ResourceExhausted(f"{len(ids)} positions need {self.kv.blocks_for(len(ids))} KV blocks; the whole KV cache "
                                        f"holds {self.kv.num_blocks} (raise kv_cache_mb)", field=field)
            return ids, score_from
        total = len(ids) + req.params.max_new_tokens
        if len(ids) >= self.max_seq_len:
            raise InvalidArgument(f"the prompt has {len(ids)} tokens; max_seq_len {self.max_seq_len} leaves no room for a new token", field=field)
        if total > self.max_seq_len:
            raise InvalidArgument(f"{len(ids)} prompt tokens + {req.params.max_new_tokens} new tokens exceed max_seq_len {self.max_seq_len}: "
                                  f"ask for at most {self.max_seq_len - len(ids)} new tokens", field="max_new_tokens")
        if self.kv.blocks_for(total) > self.kv.num_blocks:
            raise ResourceExhausted(f"{total} positions need {self.kv.blocks_for(total)} KV blocks; the whole KV cache holds "
                                    f"{self.kv.num_blocks} (raise kv_cache_mb, or lower max_new_tokens)", field="max_new_tokens")
        return ids, score_from

    def _check_ids(self, ids: list[int], field: str) -> list[int]:
        ids = list(ids)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgument(f"token ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}", field=field)
        return ids

    def _check_text_size(self, req: GenerateRequest) -> None:
        """Refuse text that cannot fit before spending time tokenising it."""
        if req.prompt_ids is not None:
            self._check_fits(len(req.prompt_ids), "token ids", "prompt_ids")
        elif req.messages is not None:
            # a million empty turns passed the character count and held the one tokeniser thread,
            # every caller's, for half a minute
            check_message_count(len(req.messages), self.max_seq_len)
            self._check_fits(sum(len(str(m.get("content") or "")) for m in req.messages), "characters", "messages")
        else:
            self._check_fits(len(req.prompt or ""), "characters", "prompt")
        if req.task is Task.SCORE:
            cont = req.continuation
            self._check_fits(len(cont), "token ids" if isinstance(cont, list) else "characters", "continuation")

    def _check_fits(self, size: int, unit: str, field: str, what: str = "") -> None:
        """At most max_seq_len token ids; at most MAX_CHARS_PER_TOKEN characters per position, since no
        token of a real tokenizer covers more of ordinary text."""
        limit = self.max_seq_len * (1 if unit == "token ids" else MAX_CHARS_PER_TOKEN)
        if size > limit:
            raise InvalidArgument(f"{what}{size} {unit} cannot fit in max_seq_len {self.max_seq_len} (at most {limit} {unit})", field=field)

    def make_row(self, req: GenerateRequest, sink: Callable[[StreamEvent], None]) -> Row:
        ids, score_from = self._tokens(req)
        gen = None
        if req.params.temperature > 0 and req.params.seed is not None:
            gen = torch.Generator(device=self.runner.device).manual_seed(req.params.seed)
        row = Row(req, ids, sink, IncrementalDetokenizer(self.tokenizer, ids), StopMatcher(list(req.params.stop)), generator=gen)
        if req.task is Task.SCORE:
            row.score_from, row.scored = score_from, [None] * (len(ids) - score_from)
        return row

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
        result = self._execute(out)
        self._update(out, result)
        if out.scheduled:
            self.scheduler.observe(out, time.perf_counter() - start)
        return out

    def _execute(self, out: SchedulerOutput) -> ForwardOutput | None:
        """One packed forward → logits [rows that sample, vocab] and the prefill-only rows' readouts.
        A LoRA slot that fails to load, or a forward that raises, costs only the rows it concerns (NaN logits)."""
        if not out.scheduled:
            return None
        for slot, weights in out.lora_loads:
            try:
                self.runner.load_lora(slot, weights)
            except Exception as e:  # noqa: BLE001 - e.g. a corrupted device copy of the adapter
                self.scheduler.lora_slots.invalidate(slot)
                if isinstance(e, torch.OutOfMemoryError):
                    e = ResourceExhausted(f"out of device memory loading the adapter's LoRA weights into its slot: {e}", field="adapter_id")
                for s in out.scheduled:
                    if s.row.lora_slot == slot:
                        s.row.error = e if isinstance(e, HotswapError) else HotswapError(
                            f"loading the adapter's LoRA weights failed: {type(e).__name__}: {e}")
        good = [s for s in out.scheduled if s.row.error is None]
        if len(good) == len(out.scheduled):
            return self._guarded(good)
        logits = torch.full((sum(s.samples for s in out.scheduled), self.vocab_size), float("nan"), device=self.runner.device)
        at = [i for i, s in enumerate(s for s in out.scheduled if s.samples) if s.row.error is None]
        if not good:
            return ForwardOutput(logits)
        ran = self._guarded(good)
        logits[torch.tensor(at, dtype=torch.long, device=logits.device)] = ran.logits
        return ForwardOutput(logits, ran.readouts)

    def _guarded(self, scheduled: list[ScheduledRow]) -> ForwardOutput:
        try:
            return self.runner.execute(scheduled)
        except Exception as e:  # noqa: BLE001 - isolate the failing row(s)
            if len(scheduled) > 1:
                return ForwardOutput.concat([self._guarded([s]) for s in scheduled])
            row = scheduled[0].row
            if isinstance(e, torch.OutOfMemoryError):  # the batch was retried row by row: this row alone does not fit
                row.error = ResourceExhausted(f"out of device memory running this request: {e}", field="prompt")
            else:
                row.error = HotswapError(f"request failed in the model forward: {type(e).__name__}: {e}")
            return ForwardOutput(torch.full((int(scheduled[0].samples), self.vocab_size), float("nan"), device=self.runner.device))

    def _update(self, out: SchedulerOutput, fwd: ForwardOutput | None) -> None:
        # A row that read blocks a failed row was writing this step read garbage: computed again later, and
        # so is a row that read blocks of such a row (leaders are scheduled before their readers).
        void: set[int] = set()
        for s in out.scheduled:
            if s.row.error is None and any(leader.error is not None or id(leader) in void for leader in s.leaders):
                void.add(id(s.row))
        sampling: list[Row] = []
        at: list[int] = []  # the sampling rows' rows of fwd.logits (it has one per sampling row scheduled)
        scheduled_samples = 0
        for s in out.scheduled:
            if s.samples:
                scheduled_samples += 1
            if id(s.row) in void:
                self.scheduler.recompute(s.row, out)
                continue
            s.row.num_computed = s.end
            if s.row.error is None:  # a failed forward may have left garbage in the row's blocks
                self.kv.commit(s.row)
            if s.samples:
                sampling.append(s.row)
                at.append(scheduled_samples - 1)
            elif not s.row.generates and s.row.error is None:
                self._read_out(s, fwd.readouts.get(s.row.key))
        if sampling:
            logits = fwd.logits if len(at) == scheduled_samples else fwd.logits[torch.tensor(at, device=fwd.logits.device)]
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

    def _read_out(self, s: ScheduledRow, values: torch.Tensor | None) -> None:
        """A prefill-only row's share of this step; its answer once its last chunk is computed."""
        row = s.row
        if values is not None:
            values = values.tolist()  # one copy to the host per row and step
        if row.request.task is Task.SCORE and values is not None:
            first = max(s.start, row.first_scored - 1) - (row.first_scored - 1)
            for i, (logprob, greedy) in enumerate(values):
                row.scored[first + i] = (logprob, bool(greedy))
        if not s.last:
            return
        if row.request.task is Task.CLASSIFY:
            if values is None or not all(math.isfinite(v) for v in values):
                row.error = HotswapError("the model produced non-finite classification logits for this request")
                return
            probs = torch.softmax(torch.tensor(values, dtype=torch.float64), 0).tolist()
            answer = Classification(list(row.score_head.labels), values, probs)
        else:
            if any(x is None or not math.isfinite(x[0]) for x in row.scored):
                row.error = HotswapError("the model produced non-finite log-probabilities for this request")
                return
            answer = ContinuationScore(row.prompt_ids[row.score_from:], [x[0] for x in row.scored], all(x[1] for x in row.scored))
        self._finish(row, FinishReason.LENGTH, None, readout=answer)  # "length": every position it asked for is computed

    def _sample(self, rows: list[Row], logits: torch.Tensor):
        params = [r.request.params for r in rows]
        penalized = self._penalize(rows, logits) if any(p.repetition_penalty != 1.0 for p in params) else None
        want = [p.logprobs for p in params if p.logprobs is not None]
        return sample_step(logits, [p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params],
                           [r.generator for r in rows], self.rng, bool(want), max(want, default=0), penalized, self.runner.backend)

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
        return apply_repetition_penalty(logits.float(), seen.to(dev), mask.to(dev), pen.to(dev))

    def _finish(self, row: Row, reason: FinishReason, error: Exception | None, token_ids: list[int] | None = None,
                lps: list[TokenLogprob] | None = None, text: str = "", readout: Classification | ContinuationScore | None = None) -> None:
        """The row's last event; its blocks, LoRA slot and adapter reference go back."""
        if row.finish_reason is not None:
            return
        row.finish_reason = reason
        row.finished_at = time.monotonic()
        self.scheduler.finish(row)
        if row.adapter is not None and self.adapters is not None:
            for adapter_id in row.adapter_ids:
                self.adapters.release(adapter_id)
        self.outbox.append((row, StreamEvent(row.request_id, token_ids or [], text, lps or [], reason, error, readout)))

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
