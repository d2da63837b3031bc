"""One generation as a network caller (gRPC or the OpenAI-compatible HTTP API) runs it.

Both front ends go through here, so they share one path: the prompt is checked and
tokenised off the event loop (TOKENIZER_POOL), events arrive through the state's
StepEventPump (one event-loop wake-up per engine step), and a caller that stops
listening has its row cancelled — freed at the engine's next step."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, AsyncIterator, Callable, TypeVar

from ..cpu_threads import serial
from ..engine.loop import RequestStream
from ..engine.request import GenerateRequest, StreamEvent
from ..errors import DeadlineExceeded, HotswapError, Unavailable

if TYPE_CHECKING:
    from ..serving import ServingCore
    from .state import ServerState

TOKENIZER_POOL = ThreadPoolExecutor(1, thread_name_prefix="hotswap-tokenize", initializer=serial)
"""Prompts are tokenised here, one at a time, never on the event loop."""

Prepare = Callable[["ServingCore", GenerateRequest], GenerateRequest]
T = TypeVar("T")


class Generation:
    """A submitted request: iterate `events()`, and `close()` when done (idempotent;
    cancels the engine row if the last event has not arrived)."""

    def __init__(self, state: ServerState, core: ServingCore, stream: RequestStream, queue: asyncio.Queue[StreamEvent]) -> None:
        self.state, self.core, self.stream, self._queue = state, core, stream, queue
        self.finished = False
        self._closed = False
        state.inflight += 1

    async def events(self, timeout: float | None = None) -> AsyncIterator[StreamEvent]:
        """Events until the last one (finish_reason set); DeadlineExceeded after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not self.finished:
                    event = await self._queue.get()
                    self.finished = event.finished
                    yield event
        except TimeoutError:
            raise DeadlineExceeded("the call's deadline passed before generation finished", field="deadline") from None
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state.inflight -= 1
        if not self.finished:
            self.core.cancel(self.stream)


async def start(state: ServerState, request: GenerateRequest, prepare: Prepare | None = None) -> Generation:
    """Validate, tokenise and enqueue `request` off the event loop (`prepare(core, request)`,
    when given, runs first on the same thread). Raises the request's error (InvalidArgument,
    NotFound, ResourceExhausted, Unavailable) before anything is streamed."""
    core = state.ready()
    queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
    notify = state.event_pump(core).notifier(queue)

    def submit() -> RequestStream:
        return core.submit(prepare(core, request) if prepare else request, notify)

    return Generation(state, core, await submit_off_loop(submit, core.cancel), queue)


async def submit_off_loop(submit: Callable[[], T], drop: Callable[[T], None]) -> T:
    """Run `submit` (it tokenises and enqueues) on TOKENIZER_POOL. If the caller leaves
    meanwhile, what it enqueued is handed to `drop` once the thread is done with it."""
    submitted = asyncio.get_running_loop().run_in_executor(TOKENIZER_POOL, submit)
    try:
        return await asyncio.shield(submitted)
    except asyncio.CancelledError:
        submitted.add_done_callback(lambda f: None if f.cancelled() or f.exception() else drop(f.result()))
        raise


def failure(event: StreamEvent) -> HotswapError | None:
    """The error a finished event carries, as the HotswapError a caller is told."""
    if not (event.finished and event.error is not None):
        return None
    if isinstance(event.error, HotswapError):
        return event.error
    return Unavailable(f"generation failed: {event.error}")
