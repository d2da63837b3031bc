"""Blocking client."""
from __future__ import annotations

import os

from typing import Iterator

import grpc

from hotswap.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc, tuner_pb2, tuner_pb2_grpc

from . import _wire
from .errors import from_rpc_error
from .types import Adapter, Classification, Generation, JobEvent, ModelInfo, Scores, StreamChunk, Tokens, TrainingJob


class Client:
    """hotswap.Client("localhost:50051").generate("Hello", adapter="support-bot")

    Every call has a deadline (`timeout`, default 300 s) and is retried on
    UNAVAILABLE; failures raise the exception class of their status code."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        ca_cert: bytes | None = None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
        server_name: str | None = None,
        timeout: float = _wire.DEFAULT_TIMEOUT,
    ) -> None:
        self.token, self.timeout = token, timeout
        creds = _wire.credentials(tls, ca_cert, client_cert, client_key)
        args = _wire.channel_args()
        if server_name:
            args.append(("grpc.ssl_target_name_override", server_name))
        self._channel = grpc.secure_channel(target, creds, args) if creds else grpc.insecure_channel(target, args)
        self._inference = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdapterServiceStub(self._channel)
        self._tuner = tuner_pb2_grpc.TunerServiceStub(self._channel)

    def _call(self, method, request, timeout: float | None, adapter: str = ""):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=_wire.metadata(self.token, adapter))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    # -- inference ------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None, adapter: str | list[tuple[str, float]] = "",
                 request_id: str = "", timeout: float | None = None, **sampling) -> Generation:
        """Sampling keywords: max_new_tokens, temperature, top_k, top_p, repetition_penalty,
        seed, stop, ignore_eos, logprobs; lora_scale multiplies a LoRA adapter's delta.
        `adapter`: an id, or [(id, weight), ...] LoRA adapters combined as Σ weight·ΔW."""
        req = inference_pb2.GenerateRequest(**_wire.generate_fields(prompt, messages, adapter, request_id, **sampling))
        return _wire.generation(self._call(self._inference.Generate, req, timeout, adapter))

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None, adapter: str | list[tuple[str, float]] = "",
               request_id: str = "", timeout: float | None = None, **sampling) -> Iterator[StreamChunk]:
        """Chunks of new text as they are generated. Leaving the loop early cancels the
        request on the server (its batch row is freed at the next step)."""
        req = inference_pb2.GenerateStreamRequest(**_wire.generate_fields(prompt, messages, adapter, request_id, **sampling))
        call = self._inference.GenerateStream(req, timeout=timeout or self.timeout, metadata=_wire.metadata(self.token, adapter))
        try:
            for msg in call:
                yield _wire.chunk(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def classify(self, text: str | None = None, *, messages: list[dict] | None = None, adapter: str,
                 request_id: str = "", timeout: float | None = None) -> Classification:
        """Labels, logits and probabilities of a sequence-classification adapter (PEFT SEQ_CLS) for a text or chat."""
        req = _wire.classify_request(text, messages, adapter, request_id)
        return _wire.classification(self._call(self._inference.Classify, req, timeout, adapter))

    def score(self, prompt: str | None = None, candidates: list[str] = (), *, messages: list[dict] | None = None,
              adapter: str = "", request_id: str = "", timeout: float | None = None) -> Scores:
        """Log-likelihood of each candidate completion of the prompt (multiple-choice evaluation).
        Each candidate is tokenized on its own and appended to the prompt's tokens."""
        req = _wire.score_request(prompt, candidates, messages, adapter, request_id)
        return _wire.scores(self._call(self._inference.Score, req, timeout, adapter), list(candidates))

    def tokenize(self, prompt: str | None = None, *, messages: list[dict] | None = None, timeout: float | None = None) -> Tokens:
        return _wire.tokens(self._call(self._inference.Tokenize, inference_pb2.TokenizeRequest(**_wire.tokenize_fields(prompt, messages)), timeout))

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        return _wire.model_info(self._call(self._inference.ModelInfo, inference_pb2.ModelInfoRequest(), timeout))

    # -- adapters -----------------------------------------------------------------------
    def register_adapter(self, name: str, source_uri: str, labels: dict[str, str] | None = None, timeout: float | None = None) -> Adapter:
        req = adapters_pb2.RegisterAdapterRequest(name=name, source_uri=str(source_uri), labels=labels or {})
        return _wire.adapter(self._call(self._adapters.RegisterAdapter, req, timeout).adapter)

    def list_adapters(self, name: str = "", page_size: int = 100, timeout: float | None = None) -> list[Adapter]:
        """Every registered adapter (all pages)."""
        out, token = [], ""
        while True:
            page = self._call(self._adapters.ListAdapters, adapters_pb2.ListAdaptersRequest(page_size=page_size, page_token=token, name=name), timeout)
            out += [_wire.adapter(a) for a in page.adapters]
            token = page.next_page_token
            if not token:
                return out

    def get_adapter(self, adapter_id: str, timeout: float | None = None) -> Adapter:
        return _wire.adapter(self._call(self._adapters.GetAdapter, adapters_pb2.GetAdapterRequest(adapter_id=adapter_id), timeout).adapter)

    def load_adapter(self, adapter_id: str, pin: bool = False, timeout: float | None = None) -> Adapter:
        return _wire.adapter(self._call(self._adapters.LoadAdapter, adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id, pin=pin), timeout).adapter)

    def unload_adapter(self, adapter_id: str, timeout: float | None = None) -> Adapter:
        return _wire.adapter(self._call(self._adapters.UnloadAdapter, adapters_pb2.UnloadAdapterRequest(adapter_id=adapter_id), timeout).adapter)

    def delete_adapter(self, adapter_id: str, timeout: float | None = None) -> list[str]:
        return list(self._call(self._adapters.DeleteAdapter, adapters_pb2.DeleteAdapterRequest(adapter_id=adapter_id), timeout).deleted_ids)

    # -- tuner ----------------------------------------------------------------------------
    def train_adapter(self, name: str, method: str = "lora", *, examples: list[dict] | None = None, dataset_uri: str | None = None,
                      validation_examples: list[dict] | None = None, validation_uri: str | None = None,
                      labels: dict[str, str] | None = None, timeout: float | None = None, **hyperparameters) -> TrainingJob:
        """Queue a training job. `examples`: dicts with messages, prompt/completion,
        instruction/input/output or text; or `dataset_uri`: JSONL/CSV/Parquet path or URL.
        Hyperparameters (any left out is chosen by the tuner from the method, the data and
        the model, and recorded in the job's plan): lora_r, lora_alpha, lora_dropout,
        target_modules, num_virtual_tokens, virtual_tokens_init, prompt_tuning_init_text,
        learning_rate, epochs, batch_size, gradient_accumulation_steps, max_seq_len,
        warmup_ratio, seed, train_on_prompt, early_stopping_patience, base_protection
        ("replay", "kl", "replay+kl", "none"), replay_ratio, kl_weight, validation_fraction, optim.
        method "classification": examples carry a `label` (a name, or its index) beside text, messages
        or prompt; classifier_adapter ("lora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning"),
        label_names, class_weights (one per label; automatic: balanced) and best_metric ("f1",
        "accuracy", "precision", "recall", "eval_loss") apply."""
        req = _wire.train_request(name, method, examples, dataset_uri, validation_examples, validation_uri, labels, hyperparameters)
        return _wire.training_job((self._call(self._tuner.TrainAdapter, req, timeout)).job)

    def get_training_job(self, job_id: str, timeout: float | None = None) -> TrainingJob:
        return _wire.training_job((self._call(self._tuner.GetTrainingJob, tuner_pb2.GetTrainingJobRequest(job_id=job_id), timeout)).job)

    def list_training_jobs(self, state: str = "", page_size: int = 100, timeout: float | None = None) -> list[TrainingJob]:
        """Every job (all pages), newest first; `state` filters."""
        states = {v: k for k, v in _wire.STATES.items()}
        out, token = [], ""
        while True:
            req = tuner_pb2.ListTrainingJobsRequest(page_size=page_size, page_token=token, state=states.get(state, 0))
            page = self._call(self._tuner.ListTrainingJobs, req, timeout)
            out += [_wire.training_job(j) for j in page.jobs]
            token = page.next_page_token
            if not token:
                return out

    def watch_training_job(self, job_id: str, timeout: float | None = None) -> Iterator[JobEvent]:
        """Every event so far, then live ones, until the job ends (default deadline: none)."""
        call = self._tuner.WatchTrainingJob(tuner_pb2.WatchTrainingJobRequest(job_id=job_id), timeout=timeout,
                                            metadata=_wire.metadata(self.token))
        try:
            for msg in call:
                yield _wire.job_event(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def upload_dataset(self, path: str, chunk_bytes: int = 1 << 20, timeout: float | None = None) -> str:
        """Stream a local JSONL/CSV/Parquet file to the server; returns the uri to train on."""
        def chunks():
            with open(path, "rb") as f:
                yield tuner_pb2.UploadDatasetRequest(filename=os.path.basename(path), chunk=f.read(chunk_bytes))
                while block := f.read(chunk_bytes):
                    yield tuner_pb2.UploadDatasetRequest(chunk=block)

        return (self._call(self._tuner.UploadDataset, chunks(), timeout)).uri

    def delete_upload(self, uri: str, timeout: float | None = None) -> int:
        """Remove an uploaded dataset (uploads count against the server's quota); returns the bytes freed.
        FailedPrecondition while a queued or running job reads it."""
        return (self._call(self._tuner.DeleteUpload, tuner_pb2.DeleteUploadRequest(uri=uri), timeout)).size_bytes

    def cancel_training_job(self, job_id: str, timeout: float | None = None) -> TrainingJob:
        return _wire.training_job((self._call(self._tuner.CancelTrainingJob, tuner_pb2.CancelTrainingJobRequest(job_id=job_id), timeout)).job)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
