"""The engine: one step = schedule → execute → update.

`Engine` is single-threaded and owns the model; `EngineLoop` runs it on its
own thread behind a small thread-safe API (submit / cancel / shutdown) that
the gRPC layer uses."""
from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..config import EngineConfig
from ..errors import Cancelled, HotswapError, InvalidArgument, ResourceExhausted, Unavailable
from .batch import Row
from .detokenize import IncrementalDetokenizer, StopMatcher
from .request import FinishReason, GenerateRequest, GenerateResult, StreamEvent, TokenLogprob
from .runner import ModelRunner
from .sampling import apply_repetition_penalty, process_and_sample
from .scheduler import Scheduler, SchedulerOutput

log = logging.getLogger("hotswap.engine")

if TYPE_CHECKING:
    from ..adapters.cache import AdapterCache
    from ..model.loader import LoadedModel


class Engine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig | None = None, adapters: AdapterCache | None = None) -> None:
        self.cfg = cfg or EngineConfig()
        self.tokenizer = loaded.tokenizer
        self.runner = ModelRunner(loaded, self.cfg)
        self.adapters = adapters
        self.scheduler = Scheduler(self.cfg, adapters)
        self.eos_ids = _eos_ids(loaded)
        self.vocab_size = self.runner.head.out_features

    # -- intake ----------------------------------------------------------------
    def tokenize(self, req: GenerateRequest) -> list[int]:
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
        if len(ids) + req.params.max_new_tokens > self.cfg.max_seq_len:
            raise InvalidArgument(
                f"{len(ids)} prompt tokens + {req.params.max_new_tokens} new tokens exceed max_seq_len {self.cfg.max_seq_len}",
                field="prompt",
            )
        return ids

    def make_row(self, req: GenerateRequest, sink: Callable[[StreamEvent], None]) -> Row:
        ids = self.tokenize(req)
        gen = None
        if req.params.temperature > 0:
            gen = torch.Generator(device=self.runner.device)
            gen.manual_seed(req.params.seed if req.params.seed is not None else torch.seed())
        return Row(req, ids, sink, IncrementalDetokenizer(self.tokenizer, ids), StopMatcher(list(req.params.stop)), generator=gen)

    def add_row(self, row: Row) -> None:
        self.scheduler.add(row)

    def abort(self, request_id: str) -> bool:
        row = self.scheduler.remove_waiting(request_id)
        if row is not None:
            self._emit(row, [], [], FinishReason.CANCELLED, Cancelled("cancelled by the client"))
            return True
        for row in self.scheduler.running:
            if row.request_id == request_id:
                row.cancelled = True
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or len(self.scheduler.running))

    # -- the step ----------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> SchedulerOutput:
        for row in self.scheduler.running:
            if row.cancelled:
                self._emit(row, [], [], FinishReason.CANCELLED, Cancelled("cancelled by the client"))
        self._retire()
        out = self.scheduler.schedule()
        for row, error in out.failed:
            self._emit(row, [], [], FinishReason.ERROR, error)
        rows, logits = self._execute(out)
        if rows:
            self._update(rows, logits)
        self._retire()
        return out

    def _execute(self, out: SchedulerOutput) -> tuple[list[Row], torch.Tensor | None]:
        """Decode the running rows, prefill the admitted ones; a forward that raises is
        retried row by row so only the rows that fail on their own are lost."""
        n_run = len(out.decode)
        self.scheduler.running.concatenate(out.prefill)
        parts = []
        if out.decode:
            parts.append(self._guarded(self.runner.decode, 0, out.decode))
        if out.prefill:
            parts.append(self._guarded(self.runner.prefill, n_run, out.prefill))
        if not parts:
            return [], None
        return out.decode + out.prefill, torch.cat(parts)

    def _guarded(self, fn, first_slot: int, rows: list[Row]) -> torch.Tensor:
        try:
            return fn(first_slot, rows)
        except Exception as e:  # noqa: BLE001 - isolate the failing row(s)
            if len(rows) == 1:
                if isinstance(e, torch.OutOfMemoryError):  # the whole batch was retried row by row: this row alone does not fit
                    rows[0].error = ResourceExhausted(f"out of device memory running this request: {e}", field="prompt")
                else:
                    rows[0].error = HotswapError(f"request failed in the model forward: {type(e).__name__}: {e}")
                return torch.full((1, self.vocab_size), float("nan"), device=self.runner.device)
            return torch.cat([self._guarded(fn, first_slot + i, [row]) for i, row in enumerate(rows)])

    def _update(self, rows: list[Row], logits: torch.Tensor) -> None:
        logits = logits[:, : self.vocab_size]  # (rows, vocab)
        bad = ~torch.isfinite(logits).all(dim=-1)
        logits = torch.nan_to_num(logits)
        raw = logits
        params = [r.request.params for r in rows]
        if any(p.repetition_penalty != 1.0 for p in params):
            logits = self._penalize(rows, logits)
        dev = logits.device
        tokens = process_and_sample(
            logits,
            torch.tensor([p.temperature for p in params], device=dev),
            torch.tensor([p.top_k for p in params], device=dev),
            torch.tensor([p.top_p for p in params], device=dev),
            [r.generator for r in rows],
        ).tolist()
        bad = bad.tolist()
        want_lp = [p.logprobs is not None for p in params]
        logp = torch.log_softmax(raw, dim=-1) if any(want_lp) else None
        now = time.monotonic()
        for i, row in enumerate(rows):
            if bad[i] or row.error is not None:
                err = row.error or HotswapError("the model produced non-finite logits for this request")
                self._emit(row, [], [], FinishReason.ERROR, err)
                continue
            tok = tokens[i]
            row.output_ids.append(tok)
            row.first_token_at = row.first_token_at or now
            lps = []
            if want_lp[i]:
                k = params[i].logprobs
                top = logp[i].topk(k) if k else None
                lps = [TokenLogprob(tok, float(logp[i, tok]), list(zip(top.indices.tolist(), top.values.tolist())) if top else [])]
                row.logprobs.extend(lps)
            self._advance(row, tok, lps)

    def _advance(self, row: Row, tok: int, lps: list[TokenLogprob]) -> None:
        p = row.request.params
        if tok in self.eos_ids and not p.ignore_eos:
            self._emit(row, [tok], lps, FinishReason.EOS, text=row.stop.push(row.detok.flush())[0] + row.stop.flush())
            return
        text, stopped = row.stop.push(row.detok.push(tok))
        if stopped:
            self._emit(row, [tok], lps, FinishReason.STOP, text=text)
        elif len(row.output_ids) >= p.max_new_tokens:
            rest, _ = row.stop.push(row.detok.flush())
            self._emit(row, [tok], lps, FinishReason.LENGTH, text=text + rest + row.stop.flush())
        else:
            self._emit(row, [tok], lps, None, text=text)

    def _penalize(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        seqs = [r.prompt_ids + r.output_ids for r in rows]
        width = max(len(s) for s in seqs)
        seen = torch.zeros(len(rows), width, dtype=torch.long, device=logits.device)
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=logits.device)
        for i, s in enumerate(seqs):
            seen[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        pen = torch.tensor([r.request.params.repetition_penalty for r in rows], device=logits.device)
        return apply_repetition_penalty(logits, seen, mask, pen)

    def _retire(self) -> None:
        self.scheduler.running.filter(lambda r: r.finish_reason is None, self.runner.move_row)

    def _emit(self, row: Row, token_ids: list[int], lps: list[TokenLogprob], reason: FinishReason | None,
              error: Exception | None = None, text: str = "") -> None:
        if reason is not None:
            row.finish_reason = reason
            row.finished_at = time.monotonic()
            if row.adapter is not None and self.adapters is not None:
                self.adapters.release(row.request.adapter_id)
        try:
            row.sink(StreamEvent(row.request_id, token_ids, text, lps, reason, error))
        except Exception:  # noqa: BLE001 - a broken consumer ends only its own request
            row.finish_reason = row.finish_reason or FinishReason.CANCELLED


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids = set()
    gen = getattr(loaded.model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return ids


class RequestStream:
    """The caller's end of one request: iterate for StreamEvents, or result() to wait for all."""

    def __init__(self, request: GenerateRequest, prompt_tokens: int) -> None:
        self.request = request
        self.prompt_tokens = prompt_tokens
        self._events: queue.Queue[StreamEvent] = queue.Queue()
        self._submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.row: Row | None = None
        self._history: list[StreamEvent] = []
        self.generated_tokens = 0
        self.finish_reason: FinishReason | None = None

    def put(self, event: StreamEvent) -> None:  # engine thread
        now = time.monotonic()
        if event.token_ids and self.first_token_at is None:
            self.first_token_at = now
        self.generated_tokens += len(event.token_ids)
        if event.finished:
            self.finished_at = now
            self.finish_reason = event.finish_reason
        self._events.put(event)

    @property
    def submitted_at(self) -> float:
        return self._submitted

    @property
    def queue_time(self) -> float:
        """Seconds from submit to admission (to the end, if never admitted); valid once finished."""
        return ((self.row and self.row.admitted_at) or self.finished_at) - self._submitted

    def __iter__(self) -> Iterator[StreamEvent]:
        yield from self._take()

    def _take(self, deadline: float | None = None) -> Iterator[StreamEvent]:
        """Events not yet taken, in order; each is also kept for result()."""
        while not (self._history and self._history[-1].finished):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError(f"request {self.request.request_id} did not finish in time") from None
            self._history.append(event)
            yield event

    def result(self, timeout: float | None = None) -> GenerateResult:
        """Wait for the end; aggregates every event, including those already iterated."""
        for _ in self._take(None if timeout is None else time.monotonic() + timeout):
            pass
        events = self._history
        last, start = events[-1], self._submitted
        return GenerateResult(
            request_id=self.request.request_id,
            text="".join(e.text for e in events),
            token_ids=[t for e in events for t in e.token_ids],
            finish_reason=last.finish_reason,
            prompt_tokens=self.prompt_tokens,
            logprobs=[lp for e in events for lp in e.logprobs],
            queue_time=self.queue_time,
            time_to_first_token=(self.first_token_at or self.finished_at) - start,
            total_time=self.finished_at - start,
            error=last.error,
        )


@dataclass(frozen=True)
class LoopSnapshot:
    """What the engine is doing, published by the engine thread after every step
    for readers on other threads (metrics, ModelInfo) without touching its queues."""

    running: int = 0
    waiting: int = 0
    """Admitted to the scheduler but not running, plus submitted but not yet taken in."""
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()


class EngineLoop:
    """Runs an Engine on its own thread. submit/cancel/shutdown are safe from any thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queued = 0  # submitted, not yet admitted or finished
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hotswap-engine", daemon=True)
        if engine.adapters is not None:
            engine.adapters.on_ready = self._wake.set
        self.step_error: BaseException | None = None
        self.snapshot = LoopSnapshot()
        self.on_step: Callable[[SchedulerOutput, int], None] | None = None
        """Called on the engine thread after each step with its output and the rows it ran."""
        self.on_finish: Callable[[RequestStream], None] | None = None
        """Called on the engine thread when a request ends, however it ends (metrics)."""

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def submit(self, request: GenerateRequest, notify: Callable[[StreamEvent], None] | None = None) -> RequestStream:
        """Validate and enqueue. Raises InvalidArgument, ResourceExhausted (queue full) or
        Unavailable (shutting down) at once; everything later arrives as events on the
        returned stream, and is also passed to `notify` (on the engine thread) when given."""
        if self._stopping:
            raise Unavailable("the engine is shutting down")
        stream = RequestStream(request, 0)

        def sink(event: StreamEvent) -> None:
            stream.put(event)
            if event.finished and self.on_finish is not None:
                try:
                    self.on_finish(stream)
                except Exception:  # noqa: BLE001 - an observer never costs a request its result
                    log.exception("on_finish observer failed")
            if notify is not None:
                notify(event)
        row = self.engine.make_row(request, self._counting(sink))
        stream.prompt_tokens = len(row.prompt_ids)
        stream.row = row
        with self._lock:
            if self._queued >= self.engine.cfg.max_queue:
                raise ResourceExhausted(f"the request queue is full ({self.engine.cfg.max_queue} waiting)", field="max_queue")
            self._queued += 1
        self._inbox.put(("add", row))
        self._wake.set()
        return stream

    def _counting(self, sink: Callable[[StreamEvent], None]) -> Callable[[StreamEvent], None]:
        first = [True]

        def wrapped(event: StreamEvent) -> None:
            if first[0]:
                first[0] = False
                with self._lock:
                    self._queued -= 1
            sink(event)

        return wrapped

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _drain_inbox(self) -> None:
        while True:
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                self.engine.add_row(arg)
            else:
                self.engine.abort(arg)

    def _run(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_work:
                self._publish(None)
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                out = self.engine.step()
            except Exception as e:  # noqa: BLE001 - an engine bug ends the batch's requests, not the server
                self.step_error = e
                self._fail_all(HotswapError(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            self._publish(out)
            if out.empty:
                # Everything waiting is blocked on an adapter load; sleep until it lands.
                self._wake.wait(0.01)
                self._wake.clear()
        self._drain_inbox()
        self._fail_all(Unavailable("the engine shut down"), FinishReason.CANCELLED)

    def _publish(self, out: SchedulerOutput | None) -> None:
        sched = self.engine.scheduler
        running, waiting = sched.running.rows, sched.waiting
        with self._lock:
            queued = self._queued  # submitted and not yet out of prefill: inbox + scheduler queue
        self.snapshot = LoopSnapshot(
            running=len(running),
            waiting=max(queued, len(waiting)),
            running_adapters=tuple(sorted({r.request.adapter_id for r in running if r.request.adapter_id})),
            waiting_adapters=tuple(sorted({r.request.adapter_id for r in waiting if r.request.adapter_id})),
        )
        if out is not None and self.on_step is not None and not out.empty:
            self.on_step(out, len(out.decode) + len(out.prefill))

    def _fail_all(self, error: HotswapError, reason: FinishReason = FinishReason.ERROR) -> None:
        sched = self.engine.scheduler
        for row in list(sched.waiting) + list(sched.running):
            if row.finish_reason is None:
                self.engine._emit(row, [], [], reason, error)
        sched.waiting.clear()
        sched.running.rows.clear()
