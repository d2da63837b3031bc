"""Run one training job: load the base exactly as the server does, build the PEFT
model for the method, train with transformers' Trainer (checkpoints, resume,
eval, early stopping, best-by-eval-loss all come from it), report progress into
the job store, and register the result so the server can serve it at once."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from pathlib import Path

import torch
from peft import (
    LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, get_peft_model,
    prepare_model_for_kbit_training,
)
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from hotswap.server.adapters.load import load_adapter
from hotswap.server.adapters.registry import AdapterRegistry
from hotswap.server.adapters.validate import BaseShape
from hotswap.server.config import ModelConfig
from hotswap.server.errors import HotswapError
from hotswap.server.model.loader import LoadedModel, load_base_model

from .data import Tokenized, detect_format, read_examples, tokenize
from .jobs import Job, JobStore
from .spec import TrainSpec, check_against_base, linear_names

log = logging.getLogger("hotswap.tuner")


class Cancelled(Exception):
    pass


class Interrupted(Exception):
    """The worker is stopping (SIGTERM): the job goes back to the queue at a checkpoint."""


def peft_config(spec: TrainSpec, loaded: LoadedModel):
    hp, task = spec.hyperparameters, "CAUSAL_LM"
    if spec.method in ("lora", "qlora"):
        targets = "all-linear" if hp.target_modules == ["all-linear"] else hp.target_modules
        return LoraConfig(task_type=task, r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout, target_modules=targets)
    if spec.method == "prompt_tuning":
        if hp.prompt_tuning_init_text:
            return PromptTuningConfig(task_type=task, num_virtual_tokens=hp.num_virtual_tokens, prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=hp.prompt_tuning_init_text, tokenizer_name_or_path=str(loaded.checkpoint_dir))
        return PromptTuningConfig(task_type=task, num_virtual_tokens=hp.num_virtual_tokens)
    if spec.method == "p_tuning":
        return PromptEncoderConfig(task_type=task, num_virtual_tokens=hp.num_virtual_tokens, encoder_hidden_size=loaded.model.config.hidden_size)
    return PrefixTuningConfig(task_type=task, num_virtual_tokens=hp.num_virtual_tokens)


class Collator:
    """Pads a batch (labels with -100 where there is no loss)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        n = max(len(x["input_ids"]) for x in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, x in enumerate(batch):
            k = len(x["input_ids"])
            ids[i, :k] = torch.tensor(x["input_ids"])
            labels[i, :k] = torch.tensor(x["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Progress(TrainerCallback):
    """Trainer events → job events and job fields; also where a cancel is noticed."""

    def __init__(self, store: JobStore, job: Job, worker: str, stop: threading.Event | None = None) -> None:
        self.store, self.job, self.worker, self.stop = store, job, worker, stop
        self.cancelled = False
        self.interrupted = False
        self._t = time.monotonic()
        self._tokens = 0
        self._step_times: list[float] = []

    def on_train_begin(self, args, state, control, **kw):
        self._t = self._log_t = time.monotonic()
        self._tokens = state.num_input_tokens_seen  # non-zero when resuming

    def on_step_end(self, args, state, control, **kw):
        now = time.monotonic()
        self._step_times.append(now - self._t)
        self._t = now
        recent = self._step_times[-20:]
        eta = time.time() + (state.max_steps - state.global_step) * sum(recent) / len(recent)
        ok = self.store.update(self.job.id, self.worker, step=state.global_step, total_steps=state.max_steps,
                               trained_tokens=state.num_input_tokens_seen, estimated_finish_at=eta)
        if not ok:
            self.cancelled = True
            control.should_training_stop = True
            control.should_save = False
        elif self.stop is not None and self.stop.is_set():  # checkpoint here, then hand the job back
            self.interrupted = True
            control.should_training_stop = True
            control.should_save = True

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" in logs:
            now = time.monotonic()
            dt = now - self._log_t
            self._log_t = now
            # num_input_tokens_seen counts real (non-padding) tokens and survives a resume
            tok_s = (state.num_input_tokens_seen - self._tokens) / dt if dt > 0 else 0.0
            self._tokens = state.num_input_tokens_seen
            self.store.add_event(self.job.id, "step", {
                "step": state.global_step, "total_steps": state.max_steps, "epoch": float(state.epoch or 0),
                "train_loss": float(logs["loss"]), "learning_rate": float(logs.get("learning_rate", 0.0)), "tokens_per_second": tok_s,
            })

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if metrics and "eval_loss" in metrics:
            self.store.add_event(self.job.id, "eval", {"step": state.global_step, "eval_loss": float(metrics["eval_loss"])})

    def on_save(self, args, state, control, **kw):
        self.store.add_event(self.job.id, "checkpoint", {"path": f"checkpoint-{state.global_step}", "step": state.global_step})


class Heartbeat:
    """Keeps the job claimed while a long phase (model load, tokenising) runs."""

    def __init__(self, store: JobStore, job_id: str, worker: str, every: float = 1.0) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(store, job_id, worker, every), daemon=True)

    def _run(self, store: JobStore, job_id: str, worker: str, every: float) -> None:
        while not self._stop.wait(every):
            store.update(job_id, worker)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def run_job(job: Job, store: JobStore, worker: str, registry: AdapterRegistry, model_cfg: ModelConfig,
            max_lora_rank: int, work_dir: Path, stop: threading.Event | None = None) -> None:
    """Takes a claimed job (state validating) to succeeded, failed or cancelled — or, when
    `stop` is set (the worker is shutting down), back to queued at a fresh checkpoint."""
    try:
        with Heartbeat(store, job.id, worker):
            _run(job, store, worker, registry, model_cfg, max_lora_rank, work_dir / job.id, stop)
    except Cancelled:
        store.set_state(job.id, worker, "cancelled")
    except Interrupted as e:
        store.requeue(job.id, worker, str(e))
    except HotswapError as e:
        store.set_state(job.id, worker, "failed", error_code=e.code, error_message=str(e))
    except Exception as e:  # noqa: BLE001 - a failed job must never take the worker down
        log.exception("job %s failed", job.id)
        store.set_state(job.id, worker, "failed", error_code="INTERNAL", error_message=f"{type(e).__name__}: {e}")


def _run(job: Job, store: JobStore, worker: str, registry: AdapterRegistry, model_cfg: ModelConfig,
         max_lora_rank: int, job_dir: Path, stop: threading.Event | None) -> None:
    spec = TrainSpec.from_dict(job.spec)
    hp = spec.hyperparameters
    quantization = "nf4" if spec.method == "qlora" else "none"
    loaded = load_base_model(ModelConfig(source=model_cfg.source, quantization=quantization, double_quant=model_cfg.double_quant,
                                         dtype=model_cfg.dtype, device=model_cfg.device, cache_dir=model_cfg.cache_dir))
    check_against_base(spec, linear_names(loaded.model), max_lora_rank)
    shape = BaseShape.of(loaded.model)  # before PEFT wraps the modules
    tok = loaded.tokenizer

    def prepare(source: dict, name: str) -> Tokenized:
        examples = read_examples(source, name)
        data = tokenize(examples, detect_format(examples, name), tok, hp.max_seq_len, hp.train_on_prompt, name)
        for w in data.warnings:
            store.add_event(job.id, "warning", {"message": w})
        return data

    train = prepare(spec.train, "train")
    valid = prepare(spec.validation, "validation") if spec.validation else None
    if not store.update(job.id, worker):
        raise Cancelled()
    if stop is not None and stop.is_set():
        raise Interrupted("the worker stopped before training began")

    model = loaded.model
    if quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    set_seed(hp.seed)  # the adapter's initial weights too: the same job gives the same adapter
    model = get_peft_model(model, peft_config(spec, loaded))
    collator = Collator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    steps_per_epoch = math.ceil(len(train.examples) / (hp.batch_size * hp.gradient_accumulation_steps))
    total = steps_per_epoch * hp.epochs
    every = max(1, min(50, total // 5))  # checkpoints: resumable after a crash, a handful per job
    args = TrainingArguments(
        output_dir=str(job_dir / "checkpoints"), per_device_train_batch_size=hp.batch_size, per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps, num_train_epochs=hp.epochs, learning_rate=hp.lr(spec.method),
        warmup_steps=int(hp.warmup_ratio * total), lr_scheduler_type="linear", logging_steps=1, save_strategy="steps",
        save_steps=every, save_total_limit=2, eval_strategy="steps" if valid else "no", eval_steps=every if valid else None,
        load_best_model_at_end=bool(valid), metric_for_best_model="eval_loss" if valid else None, greater_is_better=False if valid else None,
        seed=hp.seed, data_seed=hp.seed, remove_unused_columns=False, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=loaded.device.type == "cpu", include_num_input_tokens_seen="non_padding",
    )
    progress = Progress(store, job, worker, stop)
    callbacks = [progress]
    if valid and hp.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=hp.early_stopping_patience))
    trainer = Trainer(model=model, args=args, train_dataset=train.examples, eval_dataset=valid.examples if valid else None,
                      data_collator=collator, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # progress goes to the job's events, not the worker's stdout
    store.set_state(job.id, worker, "running", total_steps=total)
    resume = get_last_checkpoint(args.output_dir) if (job_dir / "checkpoints").is_dir() else None
    if resume:
        store.add_event(job.id, "warning", {"message": f"resuming from {Path(resume).name}"})
    trainer.train(resume_from_checkpoint=resume)
    if progress.cancelled:
        raise Cancelled()
    if progress.interrupted:
        raise Interrupted(f"the worker stopped; resumes from checkpoint-{trainer.state.global_step}")

    final = job_dir / "adapter"
    model.save_pretrained(final)  # the best checkpoint when there is a validation set (load_best_model_at_end)
    labels = {
        **spec.labels, "job_id": job.id, "method": spec.method, "base_fingerprint": loaded.fingerprint, "quantization": quantization,
        "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest(),
        "training_config": json.dumps(spec.to_dict()["hyperparameters"], sort_keys=True),
    }
    if not store.update(job.id, worker):  # cancelled at the last moment: register nothing
        raise Cancelled()
    record = registry.register(spec.adapter_name, str(final), lambda p: load_adapter(p, p.name, shape, max_lora_rank),
                               loaded.fingerprint, labels)
    store.set_state(job.id, worker, "succeeded", adapter_id=record.id, trained_tokens=trainer.state.num_input_tokens_seen)
