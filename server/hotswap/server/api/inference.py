"""InferenceService: Generate, GenerateStream, Classify, Score, Tokenize, ModelInfo.

Handlers never touch tensors: they hand a GenerateRequest to the serving core and
read its events through an asyncio queue the engine thread feeds. When the call
ends early (client cancel, deadline), the request is cancelled in the engine and
its row is freed at the next step."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, AsyncIterator, Callable

import grpc

from hotswap.v1 import inference_pb2, inference_pb2_grpc

from ..adapters.load import SUPPORTED
from ..engine.loop import RequestStream
from ..engine.request import GenerateRequest, GenerateResult, SamplingParams, StreamEvent
from ..errors import DeadlineExceeded, HotswapError, Unavailable
from . import convert
from .events import StepEventPump
from .state import ServerState

if TYPE_CHECKING:
    from ..serving import ServingCore

ADAPTER_METADATA_KEY = "hotswap-adapter-id"
TOKENIZER_POOL = ThreadPoolExecutor(1, thread_name_prefix="hotswap-tokenize")
"""Prompts are tokenised here, one at a time, never on the event loop."""


def metadata_adapter_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == ADAPTER_METADATA_KEY:
            return value
    return ""


class InferenceService(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._pump: StepEventPump | None = None

    def _event_pump(self, core) -> StepEventPump:
        """One per serving core, created on the server's event loop at the first call."""
        if self._pump is None or self._pump_core is not core:
            self._pump, self._pump_core = StepEventPump(asyncio.get_running_loop()), core
            core.loop.step_listeners.append(self._pump.flush)
        return self._pump

    async def _run(self, msg, context: grpc.aio.ServicerContext) -> AsyncIterator[tuple[RequestStream, StreamEvent]]:
        """Submit and yield (stream, event) until the last event; cancels the engine
        request if the caller stops listening (cancel, deadline, disconnect)."""
        core = self.state.ready()
        request = convert.generate_request(msg, metadata_adapter_id(context))
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        # submit tokenises: a long prompt must not stall every other call on the event loop
        submitted = asyncio.get_running_loop().run_in_executor(TOKENIZER_POOL, core.submit, request, self._event_pump(core).notifier(events))
        try:
            stream = await asyncio.shield(submitted)
        except asyncio.CancelledError:  # the caller left while its prompt was being tokenised: drop the row it became
            submitted.add_done_callback(lambda f: None if f.cancelled() or f.exception() else core.cancel(f.result()))
            raise
        self.state.inflight += 1
        finished = False
        try:
            remaining = context.time_remaining()
            async with asyncio.timeout(remaining):
                while not finished:
                    event = await events.get()
                    finished = event.finished
                    yield stream, event
        except TimeoutError:
            raise DeadlineExceeded(f"the call's deadline passed before generation finished", field="deadline") from None
        finally:
            self.state.inflight -= 1
            if not finished:
                core.cancel(stream)

    async def _results(self, requests: list[GenerateRequest], context: grpc.aio.ServicerContext,
                       fields: dict[str, str]) -> tuple[list[GenerateResult], str]:
        """Submit prefill-only rows together and wait for all: (their results, the versioned adapter
        id that served them). Any failure fails the call (the others are cancelled). `fields`
        renames the engine's field names to the RPC's."""
        core = self.state.ready()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        notify = self._event_pump(core).notifier(events)
        submitted = asyncio.get_running_loop().run_in_executor(TOKENIZER_POOL, _submit_all, core, requests, notify, fields)
        try:
            streams = await asyncio.shield(submitted)
        except asyncio.CancelledError:
            submitted.add_done_callback(lambda f: None if f.cancelled() or f.exception() else [core.cancel(s) for s in f.result()])
            raise
        self.state.inflight += 1
        left, failure = len(streams), None
        try:
            async with asyncio.timeout(context.time_remaining()):
                while left and failure is None:  # one row failed: the call fails, the rest need not finish
                    event = await events.get()
                    left -= event.finished
                    failure = event.error
        except TimeoutError:
            raise DeadlineExceeded("the call's deadline passed before the request finished", field="deadline") from None
        finally:
            self.state.inflight -= 1
            if left:
                for s in streams:
                    core.cancel(s)
        if failure is not None:
            raise _renamed(failure, fields) if isinstance(failure, HotswapError) else Unavailable(f"the request failed: {failure}")
        # every row's last event reached its stream before this queue: results are complete
        return [s.result(0) for s in streams], streams[0].request.adapter_id

    async def Classify(self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext) -> inference_pb2.ClassifyResponse:
        req = convert.classify_request(request, metadata_adapter_id(context))
        (result,), adapter_id = await self._results([req], context, {"prompt": "text"})
        return convert.classify_response(result, adapter_id)

    async def Score(self, request: inference_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> inference_pb2.ScoreResponse:
        reqs = convert.score_requests(request, metadata_adapter_id(context))
        results, adapter_id = await self._results(reqs, context, {})
        tokenizer = self.state.core.loaded.tokenizer  # decoding every candidate token stays off the event loop too
        return await asyncio.get_running_loop().run_in_executor(TOKENIZER_POOL, convert.score_response, results, adapter_id, tokenizer)

    @staticmethod
    def _raise_if_failed(event: StreamEvent) -> None:
        if event.finished and event.error is not None:
            if isinstance(event.error, HotswapError):
                raise event.error
            raise Unavailable(f"generation failed: {event.error}")

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        async with contextlib.aclosing(self._run(request, context)) as events:
            async for stream, event in events:
                if event.finished:
                    self._raise_if_failed(event)
                    result = stream.result(0)
                    return convert.generate_response(result, stream.request.adapter_id, self.state.core.loaded.tokenizer)
        raise Unavailable("generation ended without a result")  # pragma: no cover - the engine always finishes

    async def GenerateStream(self, request: inference_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext):
        async with contextlib.aclosing(self._run(request, context)) as events:
            async for stream, event in events:
                self._raise_if_failed(event)
                chunk = inference_pb2.GenerateStreamResponse(
                    text=event.text, token_ids=event.token_ids,
                    logprobs=convert.logprobs(event.logprobs, self.state.core.loaded.tokenizer),
                    request_id=stream.request.request_id, adapter_id=stream.request.adapter_id,
                )
                if event.finished:
                    result = stream.result(0)
                    chunk.finish_reason = convert.FINISH_REASONS[event.finish_reason]
                    chunk.prompt_tokens = result.prompt_tokens
                    chunk.generated_tokens = len(result.token_ids)
                    chunk.timing.CopyFrom(convert.timing(result))
                if chunk.text or chunk.token_ids or event.finished:
                    yield chunk

    async def Tokenize(self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext) -> inference_pb2.TokenizeResponse:
        core = self.state.ready()
        req = GenerateRequest(**convert.prompt_input(request), params=SamplingParams(max_new_tokens=1))
        ids = await asyncio.get_running_loop().run_in_executor(TOKENIZER_POOL, core.engine.tokenize, req)
        return inference_pb2.TokenizeResponse(token_ids=ids, tokens=core.loaded.tokenizer.convert_ids_to_tokens(ids))

    async def ModelInfo(self, request: inference_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext) -> inference_pb2.ModelInfoResponse:
        core = self.state.ready()
        loaded, opts = core.loaded, self.state.opts
        cfg = loaded.model.config
        return inference_pb2.ModelInfoResponse(
            source=opts.model, model_type=cfg.model_type, quantization=loaded.config.quantization,
            dtype=str(loaded.dtype).removeprefix("torch."), device=str(loaded.device), fingerprint=loaded.fingerprint,
            vocab_size=core.engine.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
            has_chat_template=bool(loaded.tokenizer.chat_template), max_seq_len=core.engine.max_seq_len,
            max_batch_size=core.engine.cfg.max_batch_size, max_lora_rank=core.cache_cfg.max_lora_rank,
            adapter_types=list(SUPPORTED),
        )


def _renamed(error: HotswapError, fields: dict[str, str]) -> HotswapError:
    error.field = fields.get(error.field, error.field)
    return error


def _submit_all(core: ServingCore, requests: list[GenerateRequest], notify: Callable[[StreamEvent], None],
                fields: dict[str, str]) -> list[RequestStream]:
    """Tokenizer thread: submit every row or none (a refused one cancels those already queued)."""
    streams: list[RequestStream] = []
    if len(requests) > 1 and requests[0].prompt_ids is None:  # Score: the prompt is tokenised once for all candidates
        try:
            ids = core.engine.prompt_tokens(requests[0])
        except HotswapError as e:
            if e.field == "continuation":  # its size is checked with the prompt's
                e.field = "candidates[0]"
            raise _renamed(e, fields) from None
        fields = {**fields, "prompt_ids": "messages" if requests[0].messages is not None else "prompt"}
        requests = [dataclasses.replace(r, prompt=None, messages=None, prompt_ids=ids) for r in requests]
    try:
        for i, req in enumerate(requests):
            try:
                streams.append(core.submit(req, notify))
            except HotswapError as e:
                if e.field == "continuation":  # the i-th candidate of a Score call
                    e.field = f"candidates[{i}]"
                raise _renamed(e, fields) from None
    except BaseException:
        for s in streams:
            core.cancel(s)
        raise
    return streams

