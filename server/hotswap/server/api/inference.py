"""InferenceService: Generate, GenerateStream, Classify, Score, Tokenize, ModelInfo.

Handlers never touch tensors: they hand a GenerateRequest to the serving core and
read its events through an asyncio queue the engine thread feeds. When the call
ends early (client cancel, deadline), the request is cancelled in the engine and
its row is freed at the next step."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import grpc

from hotswap.v1 import inference_pb2, inference_pb2_grpc

from ..adapters.load import SUPPORTED
from ..engine.loop import RequestStream
from ..engine.request import GenerateRequest, SamplingParams, StreamEvent
from ..errors import Unavailable
from . import convert, generation, readout
from .generation import TOKENIZER_POOL
from .state import ServerState

ADAPTER_METADATA_KEY = "hotswap-adapter-id"


def metadata_adapter_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == ADAPTER_METADATA_KEY:
            return value
    return ""


class InferenceService(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def _run(self, msg, context: grpc.aio.ServicerContext) -> AsyncIterator[tuple[RequestStream, StreamEvent]]:
        """Submit and yield (stream, event) until the last event; cancels the engine
        request if the caller stops listening (cancel, deadline, disconnect)."""
        convert.turns_fit(msg, self.state.ready().engine.max_seq_len)
        request = convert.generate_request(msg, metadata_adapter_id(context))
        gen = await generation.start(self.state, request)
        try:
            async for event in gen.events(context.time_remaining()):
                yield gen.stream, event
        finally:
            gen.close()

    async def Classify(self, request: inference_pb2.ClassifyRequest, context: grpc.aio.ServicerContext) -> inference_pb2.ClassifyResponse:
        convert.turns_fit(request, self.state.ready().engine.max_seq_len)
        req = convert.classify_request(request, metadata_adapter_id(context))
        (result,), adapter_id = await readout.results(self.state, [req], context.time_remaining(), {"prompt": "text"})
        return convert.classify_response(result, adapter_id)

    async def Score(self, request: inference_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> inference_pb2.ScoreResponse:
        convert.turns_fit(request, self.state.ready().engine.max_seq_len)
        reqs = convert.score_requests(request, metadata_adapter_id(context))
        results, adapter_id = await readout.results(self.state, reqs, context.time_remaining(), {})
        tokenizer = self.state.core.loaded.tokenizer  # decoding every candidate token stays off the event loop too
        return await asyncio.get_running_loop().run_in_executor(TOKENIZER_POOL, convert.score_response, results, adapter_id, tokenizer)

    @staticmethod
    def _raise_if_failed(event: StreamEvent) -> None:
        error = generation.failure(event)
        if error is not None:
            raise error

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        async with contextlib.aclosing(self._run(request, context)) as events:
            async for stream, event in events:
                if event.finished:
                    self._raise_if_failed(event)
                    result = stream.result(0)
                    return convert.generate_response(result, stream.request, self.state.core.loaded.tokenizer)
        raise Unavailable("generation ended without a result")  # pragma: no cover - the engine always finishes

    async def GenerateStream(self, request: inference_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext):
        async with contextlib.aclosing(self._run(request, context)) as events:
            async for stream, event in events:
                self._raise_if_failed(event)
                chunk = inference_pb2.GenerateStreamResponse(
                    text=event.text, token_ids=event.token_ids,
                    logprobs=convert.logprobs(event.logprobs, self.state.core.loaded.tokenizer),
                    request_id=stream.request.request_id, **convert.served_by(stream.request),
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
        convert.turns_fit(request, core.engine.max_seq_len)
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
            adapter_types=list(SUPPORTED), quantization_reason=opts.quantization_choice()[1],
        )
