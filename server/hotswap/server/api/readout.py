"""Classify and Score as a network caller runs them: prefill-only rows submitted together,
waited for together, failed together.

Like generation.py, submitting (which tokenises) runs on its TOKENIZER_POOL and events arrive
through the state's StepEventPump; a caller that leaves cancels every row of its call."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Callable

from ..engine.loop import RequestStream
from ..engine.request import GenerateRequest, GenerateResult, StreamEvent
from ..errors import DeadlineExceeded, HotswapError, Unavailable, renamed
from .generation import submit_off_loop

if TYPE_CHECKING:
    from ..serving import ServingCore
    from .state import ServerState


async def results(state: ServerState, requests: list[GenerateRequest], timeout: float | None,
                  fields: dict[str, str]) -> tuple[list[GenerateResult], str]:
    """Submit prefill-only rows together and wait for all: (their results, the versioned adapter
    id that served them). Any failure fails the call (the others are cancelled). `fields`
    renames the engine's field names to the caller's API."""
    core = state.ready()
    events: asyncio.Queue[StreamEvent] = asyncio.Queue()
    notify = state.event_pump(core).notifier(events)
    streams = await submit_off_loop(lambda: submit_all(core, requests, fields, notify),
                                    lambda queued: [core.cancel(s) for s in queued])
    state.inflight += 1
    left, failure = len(streams), None
    try:
        async with asyncio.timeout(timeout):
            while left and failure is None:  # one row failed: the call fails, the rest need not finish
                event = await events.get()
                left -= event.finished
                failure = event.error
    except TimeoutError:
        raise DeadlineExceeded("the call's deadline passed before the request finished", field="deadline") from None
    finally:
        state.inflight -= 1
        if left:
            for s in streams:
                core.cancel(s)
    if failure is not None:
        raise failed(failure, fields)
    # every row's last event reached its stream before this queue: results are complete
    return [s.result(0) for s in streams], streams[0].request.adapter_id


def failed(error: BaseException, fields: dict[str, str]) -> HotswapError:
    """A failed row's error as the caller is told it (fields in the caller's names)."""
    return renamed(error, fields) if isinstance(error, HotswapError) else Unavailable(f"the request failed: {error}")


def submit_all(core: ServingCore, requests: list[GenerateRequest], fields: dict[str, str],
               notify: Callable[[StreamEvent], None] | None = None) -> list[RequestStream]:
    """Submit every row or none (a refused one cancels those already queued). Tokenises:
    call it off the event loop."""
    streams: list[RequestStream] = []
    if len(requests) > 1 and requests[0].prompt_ids is None:  # Score: the prompt is tokenised once for all candidates
        try:
            ids = core.engine.prompt_tokens(requests[0])
        except HotswapError as e:
            if e.field == "continuation":  # its size is checked with the prompt's
                e.field = "candidates[0]"
            raise renamed(e, fields) from None
        fields = {**fields, "prompt_ids": "messages" if requests[0].messages is not None else "prompt"}
        requests = [dataclasses.replace(r, prompt=None, messages=None, prompt_ids=ids) for r in requests]
    try:
        for i, req in enumerate(requests):
            try:
                streams.append(core.submit(req, notify))
            except HotswapError as e:
                if e.field == "continuation":  # the i-th candidate of a Score call
                    e.field = f"candidates[{i}]"
                raise renamed(e, fields) from None
    except BaseException:
        for s in streams:
            core.cancel(s)
        raise
    return streams
