"""OpenAI request bodies → the engine's GenerateRequests, and what the engine returns →
OpenAI's response objects. The only module of the HTTP API that knows both."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..api.generation import Prepare
from ..engine.request import SEED_MAX, SEED_MIN, FinishReason, GenerateRequest, SamplingParams, TokenLogprob
from ..errors import InvalidArgument, NotFound, shown
from .schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from ..serving import ServingCore

FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}

# The engine's field names → the ones the caller sent.
CHAT_FIELDS = {"max_new_tokens": "max_tokens", "logprobs": "top_logprobs", "adapter_id": "model"}
COMPLETION_FIELDS = {"max_new_tokens": "max_tokens", "adapter_id": "model", "prompt_ids": "prompt"}


def _sampling(body: ChatCompletionRequest | CompletionRequest, logprobs: int | None, choice: int) -> SamplingParams:
    # n > 1 with a seed: each choice its own seed, or all n would be the same sample; wrapped
    # within the seeds torch accepts, so the largest seed with n > 1 is not refused
    seed = None if body.seed is None else (body.seed + choice - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
    return SamplingParams(
        max_new_tokens=body.new_tokens or 1,  # unset: filled from the room the prompt leaves (fill_max_tokens)
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
        repetition_penalty=body.repetition_penalty or 1.0, seed=seed, stop=body.stops, ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


def chat_requests(body: ChatCompletionRequest) -> list[GenerateRequest]:
    messages = [m.as_engine() for m in body.messages]
    return [GenerateRequest(messages=messages, params=_sampling(body, body.engine_logprobs, i)) for i in range(body.n)]


def completion_requests(body: CompletionRequest) -> list[GenerateRequest]:
    out = []
    for p in body.prompts:
        text = {"prompt": p} if isinstance(p, str) else {"prompt_ids": list(p)}
        out += [GenerateRequest(**text, params=_sampling(body, body.logprobs, i)) for i in range(body.n)]
    return out


def prepare(model: str, base_name: str, fill_max_tokens: bool, lora_scale: float = 1.0) -> Prepare:
    """What runs on the tokeniser thread before submit: `model` → the adapter it names
    ("" for the base) with its `lora_scale`, and an unset max_tokens → all the room the context leaves."""

    def run(core: ServingCore, request: GenerateRequest) -> GenerateRequest:
        adapter_id = ""
        if model != base_name:
            try:
                adapter_id = core.resolve(model)
            except (NotFound, InvalidArgument):
                raise NotFound(f"no base model or adapter named {shown(model)} (GET /v1/models lists them)", field="model") from None
        request = dataclasses.replace(request, adapter_id=adapter_id, lora_scale=lora_scale)  # checked here, with the adapter
        return _fill_max_tokens(core, request) if fill_max_tokens else request

    return run


def _fill_max_tokens(core: ServingCore, request: GenerateRequest) -> GenerateRequest:
    ids = core.engine.tokenize(request)  # checks the prompt's size first, as every request's tokenising does
    virtual = core.registry.get(request.adapter_id).num_virtual_tokens if request.adapter_id else 0
    engine = core.engine
    room = min(engine.max_seq_len, engine.kv.num_blocks * engine.kv.block_size) - virtual - len(ids)
    if room < 1:
        raise InvalidArgument(f"the prompt's {len(ids)} tokens (+ {virtual} virtual) leave no room for a new token "
                              f"in max_seq_len {engine.max_seq_len}", field="messages" if request.messages is not None else "prompt")
    # Submitted as token ids, so the prompt is not tokenised twice.
    return dataclasses.replace(request, prompt=None, messages=None, prompt_ids=ids,
                               params=dataclasses.replace(request.params, max_new_tokens=room))


# -- responses -----------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(lps: list[TokenLogprob], tokenizer) -> dict:
    def entry(t: int, v: float) -> dict:
        s = _token(tokenizer, t)
        return {"token": s, "logprob": v, "bytes": list(s.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps],
            "refusal": None}


def completion_logprobs(lps: list[TokenLogprob], tokenizer, offset: int) -> tuple[dict, int]:
    """OpenAI's legacy logprobs object; `offset` is where this piece's text starts in the choice's text."""
    tokens, offsets = [], []
    for lp in lps:
        tokens.append(_token(tokenizer, lp.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    tops = [{_token(tokenizer, t): v for t, v in lp.top} for lp in lps]
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps], "top_logprobs": tops, "text_offset": offsets}, offset
