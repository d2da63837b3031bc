"""The Trainer plumbing every training method shares (train.py's causal methods and
classify.py's classifiers): the arguments (checkpoints, eval cadence, best checkpoint),
the callbacks (progress events, early stopping), running with resume / cancel / hand-back,
and registering the saved adapter with the job's labels."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Callable

from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hotswap.server.adapters.registry import AdapterRecord, AdapterRegistry
from hotswap.server.adapters.weights import Adapter
from hotswap.server.model.loader import LoadedModel

from .jobs import Job, JobStore
from .progress import Progress
from .spec import Hyperparameters


class Cancelled(Exception):
    pass


class Interrupted(Exception):
    """The worker is stopping (SIGTERM): the job goes back to the queue at a checkpoint."""


def schedule(rows: int, hp: Hyperparameters, evaluates: bool) -> tuple[int, int, int]:
    """(steps per epoch, total steps, checkpoint / eval interval)."""
    steps_per_epoch = -(-rows // (hp.batch_size * hp.gradient_accumulation_steps))
    total = steps_per_epoch * hp.epochs
    every = max(1, min(50, total // 5))  # checkpoints: resumable after a crash, a handful per job
    if evaluates:  # evaluate (and keep the checkpoint) every epoch, or every 200 steps in long epochs
        every = min(steps_per_epoch, 200)
    return steps_per_epoch, total, every


def training_arguments(hp: Hyperparameters, job_dir: Path, loaded: LoadedModel, total: int, every: int, evaluates: bool,
                       best_metric: str | None = "eval_loss", greater_is_better: bool = False, **extra) -> TrainingArguments:
    """`evaluates`: eval every `every` steps, and the checkpoint best by `best_metric` is the one kept
    at the end (when `best_metric` is None the last one is)."""
    best = evaluates and best_metric is not None
    return TrainingArguments(
        output_dir=str(job_dir / "checkpoints"), per_device_train_batch_size=hp.batch_size, per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps, num_train_epochs=hp.epochs, learning_rate=hp.learning_rate,
        warmup_steps=int(hp.warmup_ratio * total), lr_scheduler_type="linear", logging_steps=1, save_strategy="steps",
        save_steps=every, save_total_limit=2, eval_strategy="steps" if evaluates else "no", eval_steps=every if evaluates else None,
        load_best_model_at_end=best, metric_for_best_model=best_metric if best else None, greater_is_better=greater_is_better if best else None,
        seed=hp.seed, data_seed=hp.seed, remove_unused_columns=False, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=loaded.device.type == "cpu", include_num_input_tokens_seen="non_padding",
        optim=hp.optim, **extra,
    )


def callbacks_for(progress: Progress, hp: Hyperparameters, early_stopping: bool) -> list:
    out = [progress]
    if early_stopping and hp.early_stopping_patience:
        out.append(EarlyStoppingCallback(early_stopping_patience=hp.early_stopping_patience))
    return out


def train(trainer: Trainer, progress: Progress, callbacks: list, store: JobStore, job: Job, worker: str, total: int, plan: dict,
          job_dir: Path) -> None:
    """Runs (or resumes) the training; raises Cancelled / Interrupted as the job's progress saw.
    Afterwards the callbacks are detached: the job's own later evaluations are not eval events,
    nor early-stopping checks."""
    trainer.remove_callback(PrinterCallback)  # progress goes to the job's events, not the worker's stdout
    store.set_state(job.id, worker, "running", total_steps=total, plan=plan)
    resume = get_last_checkpoint(trainer.args.output_dir) if (job_dir / "checkpoints").is_dir() else None
    if resume:
        store.add_event(job.id, "warning", {"message": f"resuming from {Path(resume).name}"})
    trainer.train(resume_from_checkpoint=resume)
    if progress.cancelled:
        raise Cancelled()
    if progress.interrupted:
        raise Interrupted(f"the worker stopped; resumes from checkpoint-{trainer.state.global_step}")
    for cb in callbacks:
        trainer.remove_callback(cb)


def stop_check(store: JobStore, job: Job, worker: str, stop: threading.Event | None) -> None:
    """Before training: a cancel or a stopping worker ends the job here."""
    if not store.update(job.id, worker):
        raise Cancelled()
    if stop is not None and stop.is_set():
        raise Interrupted("the worker stopped before training began")


def register(registry: AdapterRegistry, store: JobStore, job: Job, worker: str, name: str, final: Path, validate: Callable[[Path], Adapter],
             loaded: LoadedModel, quantization: str, labels: dict[str, str], plan: dict) -> AdapterRecord:
    """Registers the saved adapter (after one last cancel check: a cancelled job registers nothing)."""
    tok = loaded.tokenizer
    labels = {
        **labels, "job_id": job.id, "base_fingerprint": loaded.fingerprint, "quantization": quantization,
        "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest(),
        "training_config": json.dumps(plan["hyperparameters"], sort_keys=True),
    }
    if not store.update(job.id, worker):
        raise Cancelled()
    return registry.register(name, str(final), validate, loaded.fingerprint, labels)
