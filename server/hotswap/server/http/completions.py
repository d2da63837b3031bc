"""Running one OpenAI completion request — one or more choices, each a row of the batch —
and shaping its output: a whole response, or server-sent events ending with
`data: [DONE]`. A client that disconnects has its rows cancelled at once (freed at the
engine's next step), streamed or not."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..api import generation
from ..api.generation import Generation, Prepare
from ..api.state import ServerState
from ..engine.request import GenerateRequest, StreamEvent
from ..errors import HotswapError
from . import convert
from .errors import from_hotswap

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the event stream


async def start_all(state: ServerState, requests: list[GenerateRequest], prepare: Prepare) -> list[Generation]:
    """Submit every choice; if one is refused, the ones already submitted are cancelled."""
    gens: list[Generation] = []
    try:
        for r in requests:
            gens.append(await generation.start(state, r, prepare))
    except BaseException:
        close_all(gens)
        raise
    return gens


def close_all(gens: list[Generation]) -> None:
    for g in gens:
        g.close()


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """(choice index, event) from every choice as they arrive, until each has finished."""
    if len(gens) == 1:
        async for event in gens[0].events():
            yield 0, event
        return
    out: asyncio.Queue[tuple[int, StreamEvent]] = asyncio.Queue()

    async def feed(i: int, g: Generation) -> None:
        async for event in g.events():
            out.put_nowait((i, event))

    tasks = [asyncio.create_task(feed(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, event = await out.get()
            left -= event.finished
            yield i, event
    finally:
        for t in tasks:
            t.cancel()


@contextlib.asynccontextmanager
async def cancelled_on_disconnect(request: Request, gens: list[Generation]) -> AsyncIterator[None]:
    """While the block runs, a client disconnect cancels every choice's row."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        close_all(gens)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        close_all(gens)


class Shape:
    """The object names and per-choice pieces of one endpoint's responses (chat or text)."""

    def __init__(self, chat: bool, model: str, tokenizer, logprobs: bool, fingerprint: str) -> None:
        self.chat, self.model, self.tokenizer, self.logprobs = chat, model, tokenizer, logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.fingerprint = f"fp_{fingerprint[:12]}"
        self._offsets: dict[int, int] = {}

    def _logprobs(self, i: int, lps) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return convert.chat_logprobs(lps, self.tokenizer)
        lp, self._offsets[i] = convert.completion_logprobs(lps, self.tokenizer, self._offsets.get(i, 0))
        return lp

    def choice(self, i: int, text: str, lps, finish: str | None, delta: bool, first: bool = False) -> dict:
        body: dict = {"index": i}
        if self.chat and delta:
            body["delta"] = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first else {}
        elif self.chat:
            body["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            body["text"] = text
        body["logprobs"] = self._logprobs(i, lps) if lps or not delta else None
        body["finish_reason"] = finish
        return body

    def envelope(self, choices: list[dict], stream: bool, usage: dict | None = None, usage_field: bool = True) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "system_fingerprint": self.fingerprint, "choices": choices}
        if usage_field:
            out["usage"] = usage
        return out


def _usage(gens: list[Generation], per_prompt: int) -> dict:
    # n choices of one prompt count its tokens once, as OpenAI does.
    prompt = sum(g.stream.prompt_tokens for g in gens[::per_prompt])
    return convert.usage(prompt, sum(g.stream.generated_tokens for g in gens))


async def whole(request: Request, gens: list[Generation], shape: Shape, per_prompt: int) -> dict:
    texts: dict[int, list[str]] = {i: [] for i in range(len(gens))}
    lps: dict[int, list] = {i: [] for i in range(len(gens))}
    finish: dict[int, str] = {}
    async with cancelled_on_disconnect(request, gens):
        async for i, event in _merged(gens):
            error = generation.failure(event)
            if error is not None:
                raise error
            texts[i].append(event.text)
            lps[i] += event.logprobs
            if event.finished:
                finish[i] = convert.FINISH_REASONS.get(event.finish_reason, "stop")
    choices = [shape.choice(i, "".join(texts[i]), lps[i], finish[i], delta=False) for i in range(len(gens))]
    return shape.envelope(choices, stream=False, usage=_usage(gens, per_prompt))


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """An SSE response whose rows are cancelled however it ends, even when the client is gone
    before its body iterator starts (then no code inside the iterator would ever run)."""

    def __init__(self, content: AsyncIterator[str], gens: list[Generation]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._gens = gens

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close_all(self._gens)


async def events(request: Request, gens: list[Generation], shape: Shape, per_prompt: int, include_usage: bool,
                 on_error: Callable[[HotswapError], None]) -> AsyncIterator[str]:
    """The SSE body. An error after the first byte cannot change the status any more: it is
    sent as an `error` event (OpenAI's shape, which the openai client raises), then [DONE]."""
    async with cancelled_on_disconnect(request, gens):
        try:
            if shape.chat:  # the assistant role comes first, as OpenAI streams it
                for i in range(len(gens)):
                    yield _sse(shape.envelope([shape.choice(i, "", [], None, delta=True, first=True)], True, usage_field=include_usage))
            async for i, event in _merged(gens):
                error = generation.failure(event)
                if error is not None:
                    raise error
                finish = convert.FINISH_REASONS.get(event.finish_reason, "stop") if event.finished else None
                if event.text or event.logprobs or finish:
                    choice = shape.choice(i, event.text, event.logprobs, finish, delta=True)
                    yield _sse(shape.envelope([choice], True, usage_field=include_usage))
            if include_usage:
                yield _sse(shape.envelope([], True, usage=_usage(gens, per_prompt)))
        except HotswapError as e:
            on_error(e)
            yield _sse(from_hotswap(e)[1])
    yield _sse("[DONE]")
