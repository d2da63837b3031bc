"""Request building and response reading shared by the sync and asyncio clients."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import grpc

from hotswap.v1 import adapters_pb2, inference_pb2

from .types import Adapter, CandidateScore, Classification, Generation, ModelInfo, Scores, StreamChunk, Timing, TokenLogprob, Tokens

DEFAULT_TIMEOUT = 300.0
"""Seconds; a generation on a busy CPU server can take minutes."""

FINISH = {
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_EOS: "eos",
    inference_pb2.FINISH_REASON_CANCELLED: "cancelled",
    inference_pb2.FINISH_REASON_ERROR: "error",
}
RESIDENCY = {adapters_pb2.RESIDENCY_REGISTERED: "registered", adapters_pb2.RESIDENCY_HOST: "host", adapters_pb2.RESIDENCY_DEVICE: "device"}

# grpc's own retry: UNAVAILABLE (server starting, draining, or a dropped connection)
# is retried with backoff before the call is committed.
SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "hotswap.v1.InferenceService"}, {"service": "hotswap.v1.AdapterService"},
                 {"service": "hotswap.v1.TunerService"}],
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.25s", "maxBackoff": "4s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }]
})


def channel_args(max_message_mb: int = 64) -> list[tuple[str, object]]:
    return [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", max_message_mb * 2**20),
        ("grpc.max_receive_message_length", max_message_mb * 2**20),
        ("grpc.keepalive_time_ms", 30_000),
    ]


def credentials(tls: bool, ca_cert: bytes | None, client_cert: bytes | None, client_key: bytes | None) -> grpc.ChannelCredentials | None:
    if not (tls or ca_cert or client_cert):
        return None
    return grpc.ssl_channel_credentials(root_certificates=ca_cert, private_key=client_key, certificate_chain=client_cert)


def metadata(token: str | None, adapter: str | list = "") -> tuple[tuple[str, str], ...]:
    md = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    if isinstance(adapter, str) and adapter and adapter.isascii() and adapter.isprintable():  # lets a router pick a replica without parsing the body
        md.append(("hotswap-adapter-id", adapter))  # (a value no header can carry is left to the server to refuse, by field)
    return tuple(md)


def generate_fields(prompt: str | None, messages: list[dict] | None, adapter: str | list[tuple[str, float]], request_id: str,
                    lora_scale: float | None = None, **sampling) -> dict:
    """`adapter`: an adapter id, or (adapter id, weight) pairs combined as Σ weight·ΔW (LoRA only)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    fields: dict = {"request_id": request_id or "", "sampling": sampling_params(**sampling)}
    if isinstance(adapter, str):
        fields["adapter_id"] = adapter
    else:
        fields["adapters"] = [inference_pb2.WeightedAdapter(adapter_id=a, weight=w) for a, w in adapter]
    if lora_scale is not None:
        fields["lora_scale"] = lora_scale
    if prompt is not None:
        fields["prompt"] = prompt
    else:
        fields["messages"] = chat(messages)
    return fields


def chat(messages: list[dict]) -> inference_pb2.ChatMessages:
    return inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


def sampling_params(max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
                    stop: list[str] | None = None, ignore_eos: bool = False, logprobs: int | None = None) -> inference_pb2.SamplingParameters:
    p = inference_pb2.SamplingParameters(
        max_new_tokens=max_new_tokens or 0, temperature=temperature or 0.0, top_k=top_k or 0, top_p=top_p or 0.0,
        repetition_penalty=repetition_penalty or 0.0, stop=list(stop or []), ignore_eos=ignore_eos,
    )
    if seed is not None:
        p.seed = seed
    if logprobs is not None:
        p.logprobs = logprobs
    return p


def logprobs(items) -> list[TokenLogprob]:
    return [TokenLogprob(x.token_id, x.token, x.logprob, [(t.token_id, t.token, t.logprob) for t in x.top]) for x in items]


def timing(t) -> Timing:
    return Timing(t.queue_seconds, t.time_to_first_token_seconds, t.total_seconds)


def generation(r: inference_pb2.GenerateResponse) -> Generation:
    return Generation(text=r.text, token_ids=list(r.token_ids), finish_reason=FINISH.get(r.finish_reason, ""),
                      prompt_tokens=r.prompt_tokens, generated_tokens=r.generated_tokens, timing=timing(r.timing),
                      request_id=r.request_id, adapter_id=r.adapter_id, logprobs=logprobs(r.logprobs),
                      adapters=[(a.adapter_id, a.weight) for a in r.adapters])


def classify_request(text: str | None, messages: list[dict] | None, adapter: str, request_id: str) -> inference_pb2.ClassifyRequest:
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text or messages")
    if not adapter:
        raise ValueError("classify needs a sequence-classification adapter")
    if text is not None:
        return inference_pb2.ClassifyRequest(adapter_id=adapter, text=text, request_id=request_id or "")
    return inference_pb2.ClassifyRequest(adapter_id=adapter, messages=chat(messages), request_id=request_id or "")


def classification(r: inference_pb2.ClassifyResponse) -> Classification:
    return Classification(labels=list(r.labels), logits=list(r.logits), probabilities=list(r.probabilities), label=r.label,
                          prompt_tokens=r.prompt_tokens, timing=timing(r.timing), request_id=r.request_id, adapter_id=r.adapter_id)


def score_request(prompt: str | None, candidates: list[str], messages: list[dict] | None, adapter: str, request_id: str) -> inference_pb2.ScoreRequest:
    if isinstance(candidates, str):
        raise TypeError("candidates must be a list of strings, not one string")
    fields = tokenize_fields(prompt, messages)
    return inference_pb2.ScoreRequest(**fields, candidates=list(candidates), adapter_id=adapter or "", request_id=request_id or "")


def scores(r: inference_pb2.ScoreResponse, candidates: list[str]) -> Scores:
    return Scores(
        candidates=[CandidateScore(text=t, logprob=c.logprob, token_ids=list(c.token_ids), tokens=list(c.tokens),
                                   token_logprobs=list(c.token_logprobs), is_greedy=c.is_greedy) for t, c in zip(candidates, r.candidates)],
        prompt_tokens=r.prompt_tokens, timing=timing(r.timing), request_id=r.request_id, adapter_id=r.adapter_id)


def chunk(r: inference_pb2.GenerateStreamResponse) -> StreamChunk:
    last = r.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
    return StreamChunk(text=r.text, token_ids=list(r.token_ids), request_id=r.request_id, adapter_id=r.adapter_id,
                       logprobs=logprobs(r.logprobs), adapters=[(a.adapter_id, a.weight) for a in r.adapters], finish_reason=FINISH.get(r.finish_reason) if last else None,
                       prompt_tokens=r.prompt_tokens, generated_tokens=r.generated_tokens,
                       timing=timing(r.timing) if last else None)


def adapter(a: adapters_pb2.Adapter) -> Adapter:
    created = datetime.fromtimestamp(a.created_at.seconds + a.created_at.nanos / 1e9, tz=timezone.utc)
    return Adapter(id=a.id, name=a.name, version=a.version, peft_type=a.peft_type, rank=a.rank,
                   target_modules=list(a.target_modules), num_virtual_tokens=a.num_virtual_tokens,
                   size_bytes=a.size_bytes, base_fingerprint=a.base_fingerprint, created_at=created,
                   source_uri=a.source_uri, residency=RESIDENCY.get(a.residency, "registered"), pinned=a.pinned,
                   labels=dict(a.labels))


def model_info(r: inference_pb2.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(source=r.source, model_type=r.model_type, quantization=r.quantization, dtype=r.dtype,
                     device=r.device, fingerprint=r.fingerprint, vocab_size=r.vocab_size, hidden_size=r.hidden_size,
                     num_layers=r.num_layers, has_chat_template=r.has_chat_template, max_seq_len=r.max_seq_len,
                     max_batch_size=r.max_batch_size, max_lora_rank=r.max_lora_rank, adapter_types=list(r.adapter_types),
                     quantization_reason=r.quantization_reason)


def tokens(r) -> Tokens:
    return Tokens(list(r.token_ids), list(r.tokens))


def tokenize_fields(prompt: str | None, messages: list[dict] | None) -> dict:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    return {"prompt": prompt} if prompt is not None else {"messages": chat(messages)}


# -- tuner ---------------------------------------------------------------------------
METHODS = {"lora": 1, "qlora": 2, "prompt_tuning": 3, "p_tuning": 4, "prefix_tuning": 5, "classification": 6}
STATES = {1: "queued", 2: "validating", 3: "running", 4: "succeeded", 5: "failed", 6: "cancelled"}
HYPERPARAMETERS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "num_virtual_tokens", "virtual_tokens_init",
                   "prompt_tuning_init_text", "learning_rate", "epochs", "batch_size", "gradient_accumulation_steps", "max_seq_len",
                   "warmup_ratio", "seed", "train_on_prompt", "early_stopping_patience", "base_protection", "replay_ratio", "kl_weight",
                   "validation_fraction", "optim", "classifier_adapter", "label_names", "class_weights", "best_metric")
CLASSIFIER_METRICS = ("accuracy", "precision", "recall", "f1")
REPEATED = ("target_modules", "label_names", "class_weights")


def _time(ts, present: bool = True):
    if not present:
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=timezone.utc)


def dataset(examples: list[dict] | None, uri: str | None, what: str):
    from hotswap.v1 import tuner_pb2

    if (examples is None) == (uri is None):
        raise ValueError(f"give exactly one of {what}_examples or {what}_uri")
    if uri is not None:
        return tuner_pb2.Dataset(uri=str(uri))
    out = []
    for e in examples:
        e = dict(e)
        if e.get("label") is not None:
            e["label"] = str(e["label"])  # a class index may be given as a number
        msgs = [inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in e.pop("messages", [])]
        out.append(tuner_pb2.TrainingExample(messages=msgs, **e))
    return tuner_pb2.Dataset(inline=tuner_pb2.InlineExamples(examples=out))


def train_request(name: str, method: str, examples, dataset_uri, validation_examples, validation_uri, labels, hyper: dict):
    from hotswap.v1 import tuner_pb2

    unknown = sorted(set(hyper) - set(HYPERPARAMETERS))
    if unknown:
        raise TypeError(f"unknown hyperparameters: {', '.join(unknown)}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}")
    req = tuner_pb2.TrainAdapterRequest(adapter_name=name, method=METHODS[method], train=dataset(examples, dataset_uri, "train"),
                                        hyperparameters=tuner_pb2.Hyperparameters(**hyper), labels=labels or {})
    if validation_examples is not None or validation_uri is not None:
        req.validation.CopyFrom(dataset(validation_examples, validation_uri, "validation"))
    return req


def _hyperparameters(h) -> dict:
    out = {f.name: getattr(h, f.name) for f in h.DESCRIPTOR.fields if f.name not in ("seed", "early_stopping_patience", "validation_fraction")}
    out |= {k: list(getattr(h, k)) for k in REPEATED}
    for k in ("seed", "early_stopping_patience", "validation_fraction"):
        out[k] = getattr(h, k) if h.HasField(k) else None
    return out


def _samples(samples) -> list:
    from .types import SampleGeneration

    return [SampleGeneration(kind=s.kind, prompt=s.prompt, reference=s.reference, before=s.before, after=s.after) for s in samples]


def quality_report(q):
    from .types import QualityReport

    return QualityReport(train_loss=q.train_loss, eval_loss=q.eval_loss if q.HasField("eval_loss") else None,
                         control_changed=q.control_changed, control_agreement=q.control_agreement, control_prompts=q.control_prompts,
                         samples=_samples(q.samples), classification=classification_report(q.classification) if q.HasField("classification") else None)


def classification_report(c):
    from .types import ClassificationReport, LabelMetrics

    return ClassificationReport(split=c.split, label_names=list(c.label_names), accuracy=c.accuracy, precision=c.precision, recall=c.recall,
                                f1=c.f1, per_label=[LabelMetrics(x.label, x.precision, x.recall, x.f1, x.support) for x in c.per_label],
                                confusion=[list(r.counts) for r in c.confusion])


def training_plan(p):
    from .types import TrainingPlan

    return TrainingPlan(hyperparameters=_hyperparameters(p.hyperparameters), automatic=list(p.automatic), train_examples=p.train_examples,
                        validation_examples=p.validation_examples, validation_held_out=p.validation_held_out,
                        replay_examples=p.replay_examples, steps_per_epoch=p.steps_per_epoch)


def training_job(j):
    from .types import TrainingJob

    methods = {v: k for k, v in METHODS.items()}
    return TrainingJob(id=j.id, adapter_name=j.adapter_name, method=methods.get(j.method, ""), state=STATES.get(j.state, ""),
                       created_at=_time(j.created_at, j.HasField("created_at")), started_at=_time(j.started_at, j.HasField("started_at")),
                       finished_at=_time(j.finished_at, j.HasField("finished_at")),
                       estimated_finish_at=_time(j.estimated_finish_at, j.HasField("estimated_finish_at")),
                       error_code=j.error_code, error_message=j.error_message, trained_tokens=j.trained_tokens, adapter_id=j.adapter_id,
                       step=j.step, total_steps=j.total_steps, plan=training_plan(j.plan) if j.HasField("plan") else None,
                       quality=quality_report(j.quality) if j.HasField("quality") else None)


def job_event(r):
    from .types import JobEvent

    kind = r.WhichOneof("event")
    ev = JobEvent(time=_time(r.time), kind=kind, job=training_job(r.job))
    if kind == "state":
        ev.state = STATES.get(r.state, "")
    elif kind == "step":
        s = r.step
        ev.metrics = {"step": s.step, "total_steps": s.total_steps, "epoch": s.epoch, "train_loss": s.train_loss,
                      "learning_rate": s.learning_rate, "tokens_per_second": s.tokens_per_second}
    elif kind == "eval":
        ev.metrics = {"step": r.eval.step, "epoch": r.eval.epoch, "eval_loss": r.eval.eval_loss}
        ev.metrics |= {k: getattr(r.eval, k) for k in CLASSIFIER_METRICS if r.eval.HasField(k)}  # classifiers
    elif kind == "checkpoint":
        ev.message = r.checkpoint
    elif kind == "samples":
        ev.message, ev.samples = r.samples.stage, _samples(r.samples.samples)
    elif kind == "report":
        ev.report = quality_report(r.report)
    else:
        ev.message = r.warning
    return ev
