"""Engine events into asyncio queues with one event-loop wake-up per engine step.

The engine thread produces one event per running request per step; waking the
event loop for each (call_soon_threadsafe per token) costs more than the work it
delivers at large batch sizes. Requests' notifiers only collect, and the
engine's per-step listener hands the whole step over in one call."""
from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Callable

from ..engine.request import StreamEvent


class StepEventPump:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, StreamEvent]] = []
        self._lock = threading.Lock()

    def notifier(self, queue: asyncio.Queue) -> Callable[[StreamEvent], None]:
        def notify(event: StreamEvent) -> None:  # engine thread
            with self._lock:
                self._pending.append((queue, event))
        return notify

    def flush(self) -> None:
        """Engine thread, once per step: deliver what the step produced."""
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            with contextlib.suppress(RuntimeError):  # the event loop already closed (server exiting)
                self.loop.call_soon_threadsafe(self._deliver, batch)

    @staticmethod
    def _deliver(batch: list[tuple[asyncio.Queue, StreamEvent]]) -> None:
        for queue, event in batch:
            queue.put_nowait(event)
