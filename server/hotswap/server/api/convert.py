"""Wire messages ↔ the engine's plain types. The only module that knows both."""
from __future__ import annotations

from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from hotswap.v1 import adapters_pb2, inference_pb2

from ..engine.request import FinishReason, GenerateRequest, GenerateResult, SamplingParams, Task, TokenLogprob, check_message_count
from ..errors import InvalidArgument

if TYPE_CHECKING:
    from ..adapters.registry import AdapterRecord

DEFAULT_MAX_NEW_TOKENS = 64
MAX_CANDIDATES = 64
"""Score: one batch row per candidate."""
CHAT_ROLES = ("system", "user", "assistant", "tool")

FINISH_REASONS = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: inference_pb2.FINISH_REASON_EOS,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: inference_pb2.FINISH_REASON_ERROR,
}
RESIDENCY = {"device": adapters_pb2.RESIDENCY_DEVICE, "host": adapters_pb2.RESIDENCY_HOST, "": adapters_pb2.RESIDENCY_REGISTERED}


def sampling_params(msg: inference_pb2.SamplingParameters) -> SamplingParams:
    """proto3 zeros mean "the default" for fields whose zero is not a usable value."""
    try:
        return SamplingParams(
            max_new_tokens=msg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            temperature=msg.temperature,
            top_k=msg.top_k,
            top_p=msg.top_p or 1.0,
            repetition_penalty=msg.repetition_penalty or 1.0,
            seed=msg.seed if msg.HasField("seed") else None,
            stop=list(msg.stop),
            ignore_eos=msg.ignore_eos,
            logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        )
    except InvalidArgument as e:
        e.field = f"sampling.{e.field}"
        raise


def chat_messages(msg: inference_pb2.ChatMessages) -> list[dict]:
    if not msg.messages:
        raise InvalidArgument("give at least one chat message", field="messages")
    out = []
    for i, m in enumerate(msg.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}", field=f"messages[{i}].role")
        out.append({"role": m.role, "content": m.content})
    return out


def turns_fit(msg, max_seq_len: int) -> None:
    """Refuses a message whose chat turns cannot fit before anything walks them (on the event loop)."""
    if msg.WhichOneof("input") == "messages":
        check_message_count(len(msg.messages.messages), max_seq_len)


def prompt_input(msg) -> dict:
    """The `input` oneof of GenerateRequest, GenerateStreamRequest and TokenizeRequest."""
    which = msg.WhichOneof("input")
    if which == "prompt":
        return {"prompt": msg.prompt}
    if which == "messages":
        return {"messages": chat_messages(msg.messages)}
    raise InvalidArgument("give a prompt or chat messages", field="prompt")


def generate_request(msg, metadata_adapter_id: str = "") -> GenerateRequest:
    kwargs = prompt_input(msg)
    combined = [(a.adapter_id, a.weight) for a in msg.adapters] or None
    return GenerateRequest(
        **kwargs,
        adapter_id=msg.adapter_id or ("" if combined else metadata_adapter_id),
        params=sampling_params(msg.sampling),
        lora_scale=msg.lora_scale if msg.HasField("lora_scale") else 1.0,
        adapters=combined,
        request_id=msg.request_id,
    )


def classify_request(msg: inference_pb2.ClassifyRequest, metadata_adapter_id: str = "") -> GenerateRequest:
    which = msg.WhichOneof("input")
    if which is None:
        raise InvalidArgument("give a text or chat messages", field="text")
    adapter_id = msg.adapter_id or metadata_adapter_id
    if not adapter_id:
        raise InvalidArgument("Classify needs a sequence-classification adapter (PEFT task_type SEQ_CLS)", field="adapter_id")
    text = {"prompt": msg.text} if which == "text" else {"messages": chat_messages(msg.messages)}
    return GenerateRequest(**text, adapter_id=adapter_id, request_id=msg.request_id, task=Task.CLASSIFY)


def score_requests(msg: inference_pb2.ScoreRequest, metadata_adapter_id: str = "") -> list[GenerateRequest]:
    """One prefill-only row per candidate (the prefix cache shares the prompt's full blocks)."""
    prompt = prompt_input(msg)
    if not msg.candidates:
        raise InvalidArgument("give at least one candidate completion", field="candidates")
    if len(msg.candidates) > MAX_CANDIDATES:
        raise InvalidArgument(f"{len(msg.candidates)} candidates; at most {MAX_CANDIDATES}", field="candidates")
    for i, c in enumerate(msg.candidates):
        if not c:
            raise InvalidArgument("the candidate is empty", field=f"candidates[{i}]")
    return [GenerateRequest(**prompt, adapter_id=msg.adapter_id or metadata_adapter_id, request_id=msg.request_id,
                            task=Task.SCORE, continuation=c) for c in msg.candidates]


def classify_response(result: GenerateResult, adapter_id: str) -> inference_pb2.ClassifyResponse:
    c = result.readout
    best = max(range(len(c.logits)), key=c.logits.__getitem__)
    return inference_pb2.ClassifyResponse(
        labels=c.labels, logits=c.logits, probabilities=c.probabilities, label=c.labels[best], prompt_tokens=result.prompt_tokens,
        timing=timing(result), request_id=result.request_id, adapter_id=adapter_id,
    )


def score_response(results: list[GenerateResult], adapter_id: str, tokenizer) -> inference_pb2.ScoreResponse:
    """Timing spans all candidates: the longest wait and the last to finish."""
    candidates = [
        inference_pb2.CandidateScore(logprob=r.readout.total, token_ids=r.readout.token_ids, token_logprobs=r.readout.logprobs,
                                     tokens=[tokenizer.decode([t]) for t in r.readout.token_ids], is_greedy=r.readout.greedy)
        for r in results
    ]
    last = max(results, key=lambda r: r.total_time)
    span = inference_pb2.Timing(queue_seconds=max(r.queue_time for r in results), time_to_first_token_seconds=last.total_time,
                                total_seconds=last.total_time)
    return inference_pb2.ScoreResponse(candidates=candidates, prompt_tokens=results[0].prompt_tokens - len(results[0].readout.token_ids),
                                       timing=span, request_id=results[0].request_id, adapter_id=adapter_id)


def logprobs(lps: list[TokenLogprob], tokenizer) -> list[inference_pb2.TokenLogprob]:
    def text(t: int) -> str:
        return tokenizer.decode([t])

    return [
        inference_pb2.TokenLogprob(
            token_id=lp.token_id, token=text(lp.token_id), logprob=lp.logprob,
            top=[inference_pb2.TopLogprob(token_id=t, token=text(t), logprob=v) for t, v in lp.top],
        )
        for lp in lps
    ]


def timing(result: GenerateResult) -> inference_pb2.Timing:
    return inference_pb2.Timing(queue_seconds=result.queue_time, time_to_first_token_seconds=result.time_to_first_token,
                                total_seconds=result.total_time)


def served_by(request: GenerateRequest) -> dict:
    """The response fields naming what served `request`: its versioned adapter id, or a combination's members."""
    members = [inference_pb2.WeightedAdapter(adapter_id=a, weight=w) for a, w in request.adapters or ()]
    return {"adapter_id": request.adapter_id, "adapters": members}


def generate_response(result: GenerateResult, request: GenerateRequest, tokenizer) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(
        text=result.text, token_ids=result.token_ids, finish_reason=FINISH_REASONS[result.finish_reason],
        prompt_tokens=result.prompt_tokens, generated_tokens=len(result.token_ids), timing=timing(result),
        logprobs=logprobs(result.logprobs, tokenizer), request_id=result.request_id, **served_by(request),
    )


def timestamp(unix: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(unix * 1e9))
    return ts


def adapter(record: AdapterRecord, residency: str, pinned: bool) -> adapters_pb2.Adapter:
    return adapters_pb2.Adapter(
        id=record.id, name=record.name, version=record.version, peft_type=record.peft_type, rank=record.rank,
        target_modules=record.target_modules, num_virtual_tokens=record.num_virtual_tokens, size_bytes=record.size_bytes,
        base_fingerprint=record.base_fingerprint, created_at=timestamp(record.created_at), source_uri=record.source_uri,
        residency=RESIDENCY[residency], pinned=pinned, labels=record.labels,
    )
