"""TunerService: training jobs over gRPC. The server only validates, queues and
reports; tuner workers (hotswap-tuner) run the jobs from the shared job store."""
from __future__ import annotations

import asyncio
import os
import re
import uuid
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from hotswap.tuner.classify_data import check_inline
from hotswap.tuner.data import READERS, detect_format
from hotswap.tuner.job_files import INLINE_PREFIX, release, uris_in_use, write_inline
from hotswap.tuner.jobs import Job, JobEvent, JobStore
from hotswap.tuner.spec import TrainSpec, check_against_base, linear_names
from hotswap.v1 import tuner_pb2, tuner_pb2_grpc

from ..errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, shown
from ..serving import ServingCore
from .convert import timestamp
from .offload import off_loop
from .state import ServerState

METHODS = {
    tuner_pb2.TRAINING_METHOD_LORA: "lora",
    tuner_pb2.TRAINING_METHOD_QLORA: "qlora",
    tuner_pb2.TRAINING_METHOD_PROMPT_TUNING: "prompt_tuning",
    tuner_pb2.TRAINING_METHOD_P_TUNING: "p_tuning",
    tuner_pb2.TRAINING_METHOD_PREFIX_TUNING: "prefix_tuning",
    tuner_pb2.TRAINING_METHOD_CLASSIFICATION: "classification",
}
METHOD_ENUM = {v: k for k, v in METHODS.items()}
STATE_ENUM = {
    "queued": tuner_pb2.JOB_STATE_QUEUED, "validating": tuner_pb2.JOB_STATE_VALIDATING, "running": tuner_pb2.JOB_STATE_RUNNING,
    "succeeded": tuner_pb2.JOB_STATE_SUCCEEDED, "failed": tuner_pb2.JOB_STATE_FAILED, "cancelled": tuner_pb2.JOB_STATE_CANCELLED,
}
STATE_NAME = {v: k for k, v in STATE_ENUM.items()}
HYPERPARAMETERS = ("lora_r", "lora_alpha", "lora_dropout", "num_virtual_tokens", "virtual_tokens_init", "prompt_tuning_init_text", "learning_rate",
                   "epochs", "batch_size", "gradient_accumulation_steps", "max_seq_len", "warmup_ratio", "train_on_prompt", "base_protection",
                   "replay_ratio", "kl_weight", "optim", "classifier_adapter", "best_metric")
REPEATED = ("target_modules", "label_names", "class_weights")
OPTIONAL = ("seed", "early_stopping_patience", "validation_fraction")
"""Fields with presence on the wire: unset is automatic, 0 is a value."""
WATCH_POLL_SECONDS = 0.25
MAX_FILENAME_BYTES = 200
"""Uploads are stored as <12 hex>-<name>: the whole stays under the 255 bytes a file name may have."""


def example(e: tuner_pb2.TrainingExample) -> dict:
    out = {k: getattr(e, k) for k in ("prompt", "completion", "instruction", "input", "output", "text", "label") if getattr(e, k)}
    if e.messages:
        out["messages"] = [{"role": m.role, "content": m.content} for m in e.messages]
    return out


def dataset(d: tuner_pb2.Dataset) -> dict:
    which = d.WhichOneof("source")
    if which == "inline":
        return {"inline": [example(e) for e in d.inline.examples]}
    if which == "uri":
        return {"uri": d.uri}
    return {}


def spec_dict(req: tuner_pb2.TrainAdapterRequest) -> dict:
    hp = {k: getattr(req.hyperparameters, k) for k in HYPERPARAMETERS}
    hp |= {k: list(getattr(req.hyperparameters, k)) for k in REPEATED}
    for k in OPTIONAL:
        if req.hyperparameters.HasField(k):
            hp[k] = getattr(req.hyperparameters, k)
    return {
        "adapter_name": req.adapter_name, "method": METHODS.get(req.method, f"(enum value {req.method})" if req.method else ""), "train": dataset(req.train),
        "validation": dataset(req.validation) if req.HasField("validation") else None,
        "hyperparameters": hp, "labels": dict(req.labels),
    }


def _ts(t: float | None) -> Timestamp | None:
    return timestamp(t) if t else None


def hyperparameters_proto(hp: dict) -> tuner_pb2.Hyperparameters:
    """The resolved values of a job's plan (every field set)."""
    known = {f.name for f in tuner_pb2.Hyperparameters.DESCRIPTOR.fields}
    return tuner_pb2.Hyperparameters(**{k: v for k, v in hp.items() if k in known and v is not None})


def plan_proto(plan: dict) -> tuner_pb2.TrainingPlan:
    return tuner_pb2.TrainingPlan(hyperparameters=hyperparameters_proto(plan["hyperparameters"]), automatic=plan["automatic"],
                                  **{k: plan[k] for k in ("train_examples", "validation_examples", "validation_held_out", "replay_examples",
                                                          "steps_per_epoch")})


def samples_proto(samples: list[dict]) -> list[tuner_pb2.SampleGeneration]:
    return [tuner_pb2.SampleGeneration(**s) for s in samples]


def quality_proto(q: dict) -> tuner_pb2.QualityReport:
    c = q.get("classification")
    return tuner_pb2.QualityReport(train_loss=q["train_loss"] or 0.0, eval_loss=q["eval_loss"], control_changed=q["control_changed"],
                                   control_agreement=q["control_agreement"], control_prompts=q["control_prompts"],
                                   samples=samples_proto(q["samples"]), classification=classification_proto(c) if c else None)


def classification_proto(c: dict) -> tuner_pb2.ClassificationReport:
    return tuner_pb2.ClassificationReport(
        split=c["split"], label_names=c["label_names"], **{k: c[k] for k in ("accuracy", "precision", "recall", "f1")},
        per_label=[tuner_pb2.LabelMetrics(**x) for x in c["per_label"]], confusion=[tuner_pb2.ConfusionRow(counts=r) for r in c["confusion"]])


def job_proto(j: Job) -> tuner_pb2.TrainingJob:
    return tuner_pb2.TrainingJob(
        id=j.id, adapter_name=j.adapter_name, method=METHOD_ENUM.get(j.method, 0), state=STATE_ENUM[j.state],
        created_at=_ts(j.created_at), started_at=_ts(j.started_at), finished_at=_ts(j.finished_at),
        estimated_finish_at=_ts(j.estimated_finish_at if j.state == "running" else None), error_code=j.error_code,
        error_message=j.error_message, trained_tokens=j.trained_tokens, adapter_id=j.adapter_id, step=j.step, total_steps=j.total_steps,
        plan=plan_proto(j.plan) if j.plan else None, quality=quality_proto(j.quality) if j.quality else None,
    )


def event_proto(e: JobEvent, job: Job) -> tuner_pb2.WatchTrainingJobResponse:
    msg = tuner_pb2.WatchTrainingJobResponse(time=timestamp(e.time), job=job_proto(job))
    p = e.payload
    if e.kind == "state":
        msg.state = STATE_ENUM[p["state"]]
    elif e.kind == "step":
        msg.step.CopyFrom(tuner_pb2.StepMetrics(**p))
    elif e.kind == "eval":
        msg.eval.CopyFrom(tuner_pb2.EvalMetrics(**p))
    elif e.kind == "checkpoint":
        msg.checkpoint = p["path"]
    elif e.kind == "samples":
        msg.samples.CopyFrom(tuner_pb2.SampleGenerations(stage=p["stage"], samples=samples_proto(p["samples"])))
    elif e.kind == "report":
        msg.report.CopyFrom(quality_proto(p))
    else:
        msg.warning = p.get("message", "")
    return msg


class TunerService(tuner_pb2_grpc.TunerServiceServicer):
    """Every store and file operation runs in the blocking pool (off_loop): a slow disk or
    database must not stall token streams on the event loop."""

    def __init__(self, state: ServerState, store: JobStore) -> None:
        self.state, self.store = state, store

    async def TrainAdapter(self, request: tuner_pb2.TrainAdapterRequest, context: grpc.aio.ServicerContext) -> tuner_pb2.TrainAdapterResponse:
        core = self.state.ready()
        job = await off_loop(self._submit, core, request)
        return tuner_pb2.TrainAdapterResponse(job=job_proto(job))

    def _submit(self, core: ServingCore, request: tuner_pb2.TrainAdapterRequest) -> Job:
        opts = self.state.opts
        inline = sum(d.inline.ByteSize() for d in (request.train, request.validation) if d.WhichOneof("source") == "inline")
        if inline > opts.max_inline_dataset_mb * 2**20:
            raise InvalidArgument(f"inline examples take {inline / 2**20:.1f} MiB; at most {opts.max_inline_dataset_mb} MiB "
                                  "(upload larger datasets with UploadDataset and pass its uri)", field="train.inline")
        spec = TrainSpec.from_dict(spec_dict(request))
        # What can be checked without the data files is checked now, so a bad request
        # fails at submit instead of in a worker minutes later.
        check_against_base(spec, linear_names(core.loaded.model), core.cache_cfg.max_lora_rank, core.loaded.device.type == "cuda",
                           base=core.loaded.model)
        policy = opts.data_policy()
        for name in ("train", "validation"):
            src = getattr(spec, name)
            if src and src.get("uri"):
                src["uri"] = policy.check(src["uri"], f"{name}.uri")
            elif src and spec.method != "classification":
                detect_format(src["inline"], name)
        if spec.method == "classification" and "inline" in spec.train:
            hp = spec.hyperparameters
            check_inline(spec.train["inline"], (spec.validation or {}).get("inline"), hp.label_names, hp.class_weights)
        written: list[dict] = []
        try:
            for name in ("train", "validation"):
                src = getattr(spec, name)
                if src and "inline" in src:
                    setattr(spec, name, write_inline(opts.uploads_dir, src["inline"], name))
                    written.append(getattr(spec, name))
            return self.store.create(spec.adapter_name, spec.method, spec.to_dict())
        except BaseException:
            for src in written:
                Path(src["uri"]).unlink(missing_ok=True)
            raise

    async def GetTrainingJob(self, request: tuner_pb2.GetTrainingJobRequest, context: grpc.aio.ServicerContext) -> tuner_pb2.GetTrainingJobResponse:
        return tuner_pb2.GetTrainingJobResponse(job=job_proto(await off_loop(self.store.get, request.job_id)))

    async def ListTrainingJobs(self, request: tuner_pb2.ListTrainingJobsRequest, context: grpc.aio.ServicerContext) -> tuner_pb2.ListTrainingJobsResponse:
        if request.state and request.state not in STATE_NAME:  # an unknown filter used to list every job
            raise InvalidArgument(f"unknown job state (enum value {request.state}); use one of {', '.join(STATE_ENUM)} or leave it unset",
                                  field="state")
        jobs, token = await off_loop(self.store.list, request.page_size, request.page_token, STATE_NAME.get(request.state, ""))
        return tuner_pb2.ListTrainingJobsResponse(jobs=[job_proto(j) for j in jobs], next_page_token=token)

    async def WatchTrainingJob(self, request: tuner_pb2.WatchTrainingJobRequest, context: grpc.aio.ServicerContext):
        await off_loop(self.store.get, request.job_id)  # NOT_FOUND before streaming anything
        seq = -1
        def read(after: int):
            # The job is read before the events (a final state implies its event is among those read), and
            # again after them when there are any: each event goes out with a job at least as new as it (the
            # first read alone could show a "succeeded" event with the job as it was just before, no adapter id).
            job = self.store.get(request.job_id)
            events = self.store.events(request.job_id, after)
            return job, events, self.store.get(request.job_id) if events else job

        while True:
            job, events, latest = await off_loop(read, seq)
            for e in events:
                yield event_proto(e, latest)
                seq = e.seq
            if job.finished and not events:
                return
            if not events:
                await asyncio.sleep(WATCH_POLL_SECONDS)

    async def CancelTrainingJob(self, request: tuner_pb2.CancelTrainingJobRequest, context: grpc.aio.ServicerContext) -> tuner_pb2.CancelTrainingJobResponse:
        def cancel() -> Job:
            job = self.store.request_cancel(request.job_id)
            if job.state == "cancelled" and not job.worker:  # never claimed: no worker will clean up after it
                release(job.spec, None)
            return job

        return tuner_pb2.CancelTrainingJobResponse(job=job_proto(await off_loop(cancel)))

    async def UploadDataset(self, request_iterator, context: grpc.aio.ServicerContext) -> tuner_pb2.UploadDatasetResponse:
        opts = self.state.opts
        limit = opts.max_upload_mb * 2**20
        path, size, f = None, 0, None
        try:
            async for msg in request_iterator:
                if path is None:
                    name = re.sub(r"[^A-Za-z0-9._-]", "_", msg.filename.rsplit("/", 1)[-1])
                    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
                    if suffix not in READERS:
                        raise InvalidArgument(f"file type {shown(suffix or '(none)', 40)} is not .jsonl, .json, .csv or .parquet", field="filename")
                    if len(msg.filename.encode()) > MAX_FILENAME_BYTES:
                        raise InvalidArgument(f"the file name has {len(msg.filename.encode())} bytes; at most {MAX_FILENAME_BYTES}", field="filename")
                    room = opts.max_uploads_total_mb * 2**20 - await off_loop(uploads_bytes, opts.uploads_dir)
                    limit = min(limit, room)
                    path = opts.uploads_dir / f"{uuid.uuid4().hex[:12]}-{name}"
                    f = await off_loop(_create, path)
                size += len(msg.chunk)
                if size > limit:
                    if limit < opts.max_upload_mb * 2**20:
                        raise ResourceExhausted(f"uploads would exceed the server's total of {opts.max_uploads_total_mb} MiB; "
                                                "delete uploads no longer needed (DeleteUpload)", field="max_uploads_total_mb")
                    raise ResourceExhausted(f"the upload is larger than {opts.max_upload_mb} MiB", field="max_upload_mb")
                await off_loop(f.write, msg.chunk)
        except BaseException:
            if f is not None:
                f.close()
                path.unlink(missing_ok=True)
            raise
        if path is None:
            raise InvalidArgument("the upload was empty: send the filename and the file's bytes", field="filename")
        f.close()
        return tuner_pb2.UploadDatasetResponse(uri=str(path.resolve()), size_bytes=size)

    async def DeleteUpload(self, request: tuner_pb2.DeleteUploadRequest, context: grpc.aio.ServicerContext) -> tuner_pb2.DeleteUploadResponse:
        return tuner_pb2.DeleteUploadResponse(size_bytes=await off_loop(self._delete_upload, request.uri))

    def _delete_upload(self, uri: str) -> int:
        uploads = self.state.opts.uploads_dir.resolve()
        path = Path(uri.removeprefix("file://"))
        # Only a file UploadDataset made: directly in the uploads folder, not a job's own inline data.
        if not uri or path.parent.resolve() != uploads or path.name.startswith(INLINE_PREFIX) or not path.is_file():
            raise NotFound("no upload at this uri (give the uri UploadDataset returned)", field="uri")
        if str(path.resolve()) in uris_in_use(self.store.unfinished_specs()):
            raise FailedPrecondition("a queued or running training job reads this upload; cancel it or wait for it to end", field="uri")
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        return size


def _create(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


def uploads_bytes(folder: Path) -> int:
    """Bytes held in the uploads folder (uploads and jobs' inline datasets)."""
    try:
        return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return 0
