"""The OpenAI-compatible HTTP API (FastAPI): routes, bearer-token auth, request bodies.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models[/{id}]   GET /health

`model` names the base model (its served name) or an adapter id (name or name@version).
Handlers only translate: every generation goes through the same path as gRPC
(api/generation.py: the serving core, its limits and metrics); bodies are read with a
size limit and parsed off the event loop."""
from __future__ import annotations

import asyncio
import hmac
import time
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from ..api.state import ServerState
from ..engine.request import GenerateRequest, check_message_count
from ..errors import HotswapError, NotFound, Unauthenticated, renamed, shown
from . import completions, convert, errors
from .schemas import ChatCompletionRequest, CompletionRequest

Body = TypeVar("Body", bound=BaseModel)
OWNER = "hotswap"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes, whatever Content-Length claims."""
    too_big = errors.HTTPFailure(413, f"the request body is larger than {limit} bytes (--max-message-mb)", "request_too_large",
                                 "RESOURCE_EXHAUSTED", "body")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(model: type[Body], raw: bytes) -> Body:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise errors.from_validation(e) from None


def build_app(state: ServerState, base_name: str) -> FastAPI:
    opts = state.opts
    app = FastAPI(title="hotswap", docs_url=None, redoc_url=None, openapi_url=None)
    errors.install(app, state.metrics)
    token = opts.auth_token.encode()
    started = int(time.time())

    async def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token)):
            raise Unauthenticated(f"{'missing' if not given else 'invalid'} bearer token (send the server's --auth-token as the API key)",
                                  field="authorization")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)] if opts.auth_token else [])

    async def body_of(request: Request, model: type[Body]) -> Body:
        raw = await read_body(request, opts.max_message_mb * 2**20)
        # JSON parsing and validation of a large body would stall every stream: off the loop.
        return await asyncio.get_running_loop().run_in_executor(None, _parse, model, raw)

    async def run(request: Request, body: ChatCompletionRequest | CompletionRequest, requests: list[GenerateRequest],
                  fields: dict[str, str], per_prompt: int, chat: bool) -> Response:
        core = state.ready()
        prepare = convert.prepare(body.model, base_name, fill_max_tokens=body.new_tokens is None,
                                  lora_scale=1.0 if body.lora_scale is None else body.lora_scale)
        try:
            gens = await completions.start_all(state, requests, prepare)
        except HotswapError as e:
            raise renamed(e, fields) from None
        shape = completions.Shape(chat, body.model, core.loaded.tokenizer, body.engine_logprobs is not None, core.loaded.fingerprint)
        if body.stream:
            def count(e: HotswapError) -> None:
                state.metrics.failures.labels(e.code).inc()

            return completions.EventStream(completions.events(request, gens, shape, per_prompt, body.include_usage, count), gens)
        try:
            return JSONResponse(await completions.whole(request, gens, shape, per_prompt))
        except HotswapError as e:
            raise renamed(e, fields) from None

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        core = state.ready()
        body = await body_of(request, ChatCompletionRequest)
        check_message_count(len(body.messages), core.engine.max_seq_len)  # before the turns are walked on the event loop
        fields = dict(convert.CHAT_FIELDS, max_new_tokens="max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        return await run(request, body, convert.chat_requests(body), fields, body.n, chat=True)

    @v1.post("/completions")
    async def text_completions(request: Request):
        state.ready()
        body = await body_of(request, CompletionRequest)
        return await run(request, body, convert.completion_requests(body), convert.COMPLETION_FIELDS, body.n, chat=False)

    def base_card(core) -> dict:
        return {"id": base_name, "object": "model", "created": started,
                "owned_by": OWNER, "root": base_name, "parent": None, "max_model_len": core.engine.max_seq_len}

    def adapter_card(record) -> dict:
        # Like vLLM's LoRA cards: the base the adapter runs on is its root and parent.
        return {"id": record.id, "object": "model", "created": int(record.created_at), "owned_by": OWNER,
                "root": base_name, "parent": base_name, "peft_type": record.peft_type}

    def all_adapters(core) -> list:
        records, page = [], ""
        while True:
            batch, page = core.registry.list(1000, page, "")
            records += batch
            if not page:
                return records

    @v1.get("/models")
    async def list_models():
        core = state.ready()
        records = await asyncio.to_thread(all_adapters, core)  # SQL: off the loop
        return {"object": "list", "data": [base_card(core), *(adapter_card(r) for r in records)]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str):
        core = state.ready()
        if model_id == base_name:
            return base_card(core)
        try:
            record = await asyncio.to_thread(core.registry.get, model_id)
        except HotswapError:
            raise NotFound(f"no base model or adapter named {shown(model_id)}", field="model") from None
        return adapter_card(record)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        """200 once serving; 503 while the model loads and while draining (no auth: for probes)."""
        state.ready()
        return {"status": "ok"}

    return app
