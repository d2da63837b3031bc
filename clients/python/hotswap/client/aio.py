"""asyncio client; the same calls as `Client`, awaited."""
from __future__ import annotations

import os

from typing import AsyncIterator

import grpc

from hotswap.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc, tuner_pb2, tuner_pb2_grpc

from . import _wire
from .errors import from_rpc_error
from .types import Adapter, Classification, Generation, JobEvent, ModelInfo, Scores, StreamChunk, Tokens, TrainingJob


class AsyncClient:
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
        self._channel = grpc.aio.secure_channel(target, creds, args) if creds else grpc.aio.insecure_channel(target, args)
        self._inference = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdapterServiceStub(self._channel)
        self._tuner = tuner_pb2_grpc.TunerServiceStub(self._channel)

    async def _call(self, method, request, timeout: float | None, adapter: str = ""):
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=_wire.metadata(self.token, adapter))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None, adapter: str | list[tuple[str, float]] = "",
                       request_id: str = "", timeout: float | None = None, **sampling) -> Generation:
        req = inference_pb2.GenerateRequest(**_wire.generate_fields(prompt, messages, adapter, request_id, **sampling))
        return _wire.generation(await self._call(self._inference.Generate, req, timeout, adapter))

    async def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None, adapter: str | list[tuple[str, float]] = "",
                     request_id: str = "", timeout: float | None = None, **sampling) -> AsyncIterator[StreamChunk]:
        req = inference_pb2.GenerateStreamRequest(**_wire.generate_fields(prompt, messages, adapter, request_id, **sampling))
        call = self._inference.GenerateStream(req, timeout=timeout or self.timeout, metadata=_wire.metadata(self.token, adapter))
        try:
            async for msg in call:
                yield _wire.chunk(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def classify(self, text: str | None = None, *, messages: list[dict] | None = None, adapter: str,
                 request_id: str = "", timeout: float | None = None) -> Classification:
        """Labels, logits and probabilities of a sequence-classification adapter (PEFT SEQ_CLS) for a text or chat."""
        req = _wire.classify_request(text, messages, adapter, request_id)
        return _wire.classification(await self._call(self._inference.Classify, req, timeout, adapter))

    async def score(self, prompt: str | None = None, candidates: list[str] = (), *, messages: list[dict] | None = None,
              adapter: str = "", request_id: str = "", timeout: float | None = None) -> Scores:
        """Log-likelihood of each candidate completion of the prompt (multiple-choice evaluation).
        Each candidate is tokenized on its own and appended to the prompt's tokens."""
        req = _wire.score_request(prompt, candidates, messages, adapter, request_id)
        return _wire.scores(await self._call(self._inference.Score, req, timeout, adapter), list(candidates))

    async def tokenize(self, prompt: str | None = None, *, messages: list[dict] | None = None, timeout: float | None = None) -> Tokens:
        req = inference_pb2.TokenizeRequest(**_wire.tokenize_fields(prompt, messages))
        return _wire.tokens(await self._call(self._inference.Tokenize, req, timeout))

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        return _wire.model_info(await self._call(self._inference.ModelInfo, inference_pb2.ModelInfoRequest(), timeout))

    async def register_adapter(self, name: str, source_uri: str, labels: dict[str, str] | None = None, timeout: float | None = None) -> Adapter:
        req = adapters_pb2.RegisterAdapterRequest(name=name, source_uri=str(source_uri), labels=labels or {})
        return _wire.adapter((await self._call(self._adapters.RegisterAdapter, req, timeout)).adapter)

    async def list_adapters(self, name: str = "", page_size: int = 100, timeout: float | None = None) -> list[Adapter]:
        out, token = [], ""
        while True:
            page = await self._call(self._adapters.ListAdapters, adapters_pb2.ListAdaptersRequest(page_size=page_size, page_token=token, name=name), timeout)
            out += [_wire.adapter(a) for a in page.adapters]
            token = page.next_page_token
            if not token:
                return out

    async def get_adapter(self, adapter_id: str, timeout: float | None = None) -> Adapter:
        return _wire.adapter((await self._call(self._adapters.GetAdapter, adapters_pb2.GetAdapterRequest(adapter_id=adapter_id), timeout)).adapter)

    async def load_adapter(self, adapter_id: str, pin: bool = False, timeout: float | None = None) -> Adapter:
        return _wire.adapter((await self._call(self._adapters.LoadAdapter, adapters_pb2.LoadAdapterRequest(adapter_id=adapter_id, pin=pin), timeout)).adapter)

    async def unload_adapter(self, adapter_id: str, timeout: float | None = None) -> Adapter:
        return _wire.adapter((await self._call(self._adapters.UnloadAdapter, adapters_pb2.UnloadAdapterRequest(adapter_id=adapter_id), timeout)).adapter)

    async def delete_adapter(self, adapter_id: str, timeout: float | None = None) -> list[str]:
        return list((await self._call(self._adapters.DeleteAdapter, adapters_pb2.DeleteAdapterRequest(adapter_id=adapter_id), timeout)).deleted_ids)

    # -- tuner ----------------------------------------------------------------------------
    async def train_adapter(self, name: str, method: str = "lora", *, examples: list[dict] | None = None, dataset_uri: str | None = None,
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
        return _wire.training_job((await self._call(self._tuner.TrainAdapter, req, timeout)).job)

    async def get_training_job(self, job_id: str, timeout: float | None = None) -> TrainingJob:
        return _wire.training_job((await self._call(self._tuner.GetTrainingJob, tuner_pb2.GetTrainingJobRequest(job_id=job_id), timeout)).job)

    async def list_training_jobs(self, state: str = "", page_size: int = 100, timeout: float | None = None) -> list[TrainingJob]:
        """Every job (all pages), newest first; `state` filters."""
        states = {v: k for k, v in _wire.STATES.items()}
        out, token = [], ""
        while True:
            req = tuner_pb2.ListTrainingJobsRequest(page_size=page_size, page_token=token, state=states.get(state, 0))
            page = await self._call(self._tuner.ListTrainingJobs, req, timeout)
            out += [_wire.training_job(j) for j in page.jobs]
            token = page.next_page_token
            if not token:
                return out

    async def watch_training_job(self, job_id: str, timeout: float | None = None) -> AsyncIterator[JobEvent]:
        """Every event so far, then live ones, until the job ends (default deadline: none)."""
        call = self._tuner.WatchTrainingJob(tuner_pb2.WatchTrainingJobRequest(job_id=job_id), timeout=timeout,
                                            metadata=_wire.metadata(self.token))
        try:
            async for msg in call:
                yield _wire.job_event(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def upload_dataset(self, path: str, chunk_bytes: int = 1 << 20, timeout: float | None = None) -> str:
        """Stream a local JSONL/CSV/Parquet file to the server; returns the uri to train on."""
        def chunks():
            with open(path, "rb") as f:
                yield tuner_pb2.UploadDatasetRequest(filename=os.path.basename(path), chunk=f.read(chunk_bytes))
                while block := f.read(chunk_bytes):
                    yield tuner_pb2.UploadDatasetRequest(chunk=block)

        return (await self._call(self._tuner.UploadDataset, chunks(), timeout)).uri

    async def delete_upload(self, uri: str, timeout: float | None = None) -> int:
        """Remove an uploaded dataset (uploads count against the server's quota); returns the bytes freed.
        FailedPrecondition while a queued or running job reads it."""
        return (await self._call(self._tuner.DeleteUpload, tuner_pb2.DeleteUploadRequest(uri=uri), timeout)).size_bytes

    async def cancel_training_job(self, job_id: str, timeout: float | None = None) -> TrainingJob:
        return _wire.training_job((await self._call(self._tuner.CancelTrainingJob, tuner_pb2.CancelTrainingJobRequest(job_id=job_id), timeout)).job)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
