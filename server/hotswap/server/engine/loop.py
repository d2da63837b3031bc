"""The engine on its own thread, behind a small thread-safe API (submit / cancel /
shutdown) that the gRPC layer uses, and the caller's end of one request."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ..cpu_threads import Turns, use_threads
from ..errors import HotswapError, ResourceExhausted, Unavailable
from .engine import Engine
from .host_memory import PeriodicTrim
from .request import FinishReason, GenerateRequest, GenerateResult, StreamEvent
from .row import Row
from .scheduler import SchedulerOutput

log = logging.getLogger("hotswap.engine")


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

    @property
    def key(self) -> int:
        """The engine's unique handle on this request (cancel with it; the request id may repeat)."""
        return self.row.key

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
            readout=last.readout,
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
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    preemptions: int = 0
    """Rows preempted (their KV blocks freed, recomputed later) since start."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache since start."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached."""
    lora_slots_busy: int = 0
    expert_lora_slots_busy: int = 0


class EngineLoop:
    """Runs an Engine on its own thread. submit/cancel/shutdown are safe from any thread.

    A step's events go out together once the step is over: each request's stream
    gets its own, then every step listener is called once (the gRPC layer wakes
    its event loop once per step, not once per token)."""

    def __init__(self, engine: Engine, turns: Turns | None = None) -> None:
        self.engine = engine
        self.turns = turns or Turns(enabled=False)
        """Shared with the adapter cache: its loads' CPU work runs between steps, not during one."""
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queued = 0  # submitted, not yet admitted or finished
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hotswap-engine", daemon=True)
        if engine.adapters is not None:
            engine.adapters.on_ready = self._wake.set
        self.step_error: BaseException | None = None
        self.snapshot = LoopSnapshot(kv_blocks_total=engine.kv.num_blocks)
        self.on_step: Callable[[SchedulerOutput, int], None] | None = None
        """Called on the engine thread after each step with its output and the rows it ran."""
        self.on_finish: Callable[[RequestStream], None] | None = None
        """Called on the engine thread when a request ends, however it ends (metrics)."""
        self.step_listeners: list[Callable[[], None]] = []
        """Called on the engine thread once per step, after that step's events went out."""

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

    def cancel(self, key: int) -> None:
        """Cancel by the stream's key (RequestStream.key)."""
        self._inbox.put(("cancel", key))
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

    def _deliver(self) -> None:
        events = self.engine.take_events()
        for row, event in events:
            try:
                row.sink(event)
            except Exception:  # noqa: BLE001 - a broken consumer ends only its own request
                log.exception("a request's event sink failed")
                if not event.finished:
                    row.cancelled = True
        if events:
            for listener in self.step_listeners:
                try:
                    listener()
                except Exception:  # noqa: BLE001
                    log.exception("step listener failed")

    def _run(self) -> None:
        use_threads()  # the process's one thread with parallel regions (cpu_threads.py)
        trim, busy = PeriodicTrim(), False
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_work:
                self._deliver()
                self._publish(None)
                if busy:  # the batch just emptied: give back what its steps freed
                    trim(force=True)
                    busy = False
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                with self.turns.step():
                    out = self.engine.step()
            except Exception as e:  # noqa: BLE001 - an engine bug ends the batch's requests, not the server
                log.exception("engine step failed")
                self.step_error = e
                self._fail_all(HotswapError(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            self._deliver()
            self._publish(out)
            busy = True
            trim()
            if out.empty:
                # Everything waiting is blocked on an adapter load; sleep until it lands.
                self._wake.wait(0.01)
                self._wake.clear()
        self._drain_inbox()
        self._fail_all(Unavailable("the engine shut down"), FinishReason.CANCELLED)

    def _publish(self, out: SchedulerOutput | None) -> None:
        engine = self.engine
        sched = engine.scheduler
        running, waiting = sched.running, sched.waiting
        with self._lock:
            queued = self._queued  # submitted and not yet out of prefill: inbox + scheduler queue
        self.snapshot = LoopSnapshot(
            running=len(running),
            waiting=max(queued, len(waiting)),
            running_adapters=tuple(sorted({r.request.adapter_id for r in running if r.request.adapter_id})),
            waiting_adapters=tuple(sorted({r.request.adapter_id for r in waiting if r.request.adapter_id})),
            kv_blocks_used=engine.kv.num_used,
            kv_blocks_total=engine.kv.num_blocks,
            preemptions=sched.num_preemptions,
            prefix_cache_queries=engine.kv.stats.queries,
            prefix_cache_hits=engine.kv.stats.hits,
            lora_slots_busy=sched.lora_slots.busy,
            expert_lora_slots_busy=sched.lora_slots.expert_busy,
        )
        if out is not None and self.on_step is not None and out.scheduled:
            self.on_step(out, len(out.scheduled))

    def _fail_all(self, error: HotswapError, reason: FinishReason = FinishReason.ERROR) -> None:
        self.engine.fail_all(error, reason)
        self._deliver()
