"""Run one training job: load the base exactly as the server does, read and split the
data, choose the automatic hyperparameters (auto.py), add the replay rows that keep the
base's behaviour (replay.py), train the method's PEFT adapter with transformers' Trainer
(checkpoints, resume, eval, early stopping, best-by-eval-loss all come from it), report
sample generations and a quality report (quality.py), and register the result so the
server can serve it at once."""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from pathlib import Path

from peft import prepare_model_for_kbit_training
from transformers import set_seed

from hotswap.server.access import SourcePolicy
from hotswap.server.adapters.load import load_adapter
from hotswap.server.adapters.registry import AdapterRegistry
from hotswap.server.adapters.validate import BaseShape
from hotswap.server.config import ModelConfig
from hotswap.server.errors import HotswapError, InvalidArgument
from hotswap.server.model.loader import load_base_model

from . import auto, fit, quality
from .classify import run_classification
from .data import detect_format, hold_out, read_examples, tokenize
from .job_files import release
from .jobs import Job, JobStore
from .methods import init_prefix_from_text, init_prompt_encoder_from_text, init_text, peft_config, wrap
from .objective import Collator, PreservingTrainer
from .fit import Cancelled, Interrupted
from .progress import Heartbeat, Progress
from .replay import BaseAnswers, pick_prompts, replay_examples, replay_rows_for
from .spec import TrainSpec, check_against_base, linear_names

log = logging.getLogger("hotswap.tuner")
TRAIN_LOSS_ROWS = 256
"""The report's train loss is measured on at most this many training examples."""


__all__ = ["Cancelled", "Interrupted", "run_job"]


def run_job(job: Job, store: JobStore, worker: str, registry: AdapterRegistry, model_cfg: ModelConfig,
            max_lora_rank: int, work_dir: Path, stop: threading.Event | None = None, data_policy: SourcePolicy | None = None,
            keep_checkpoints: bool = False) -> None:
    """Takes a claimed job (state validating) to succeeded, failed or cancelled — or, when
    `stop` is set (the worker is shutting down), back to queued at a fresh checkpoint.
    `data_policy`: the server's rule for dataset URIs, checked again where they are read
    (the spec may predate a stricter configuration). A job that ends leaves no files
    behind unless `keep_checkpoints`."""
    try:
        with Heartbeat(store, job.id, worker):
            if data_policy is not None:
                for name in ("train", "validation"):
                    src = job.spec.get(name)
                    if src and src.get("uri"):
                        data_policy.check(src["uri"], f"{name}.uri")
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
    if store.get(job.id).finished:
        release(job.spec, work_dir / job.id, keep_checkpoints)


def _run(job: Job, store: JobStore, worker: str, registry: AdapterRegistry, model_cfg: ModelConfig,
         max_lora_rank: int, job_dir: Path, stop: threading.Event | None) -> None:
    spec = TrainSpec.from_dict(job.spec)
    if spec.method == "classification":
        return run_classification(spec, job, store, worker, registry, model_cfg, max_lora_rank, job_dir, stop)
    quantization = "nf4" if spec.method == "qlora" else "none"
    loaded = load_base_model(ModelConfig(source=model_cfg.source, quantization=quantization, double_quant=model_cfg.double_quant,
                                         dtype=model_cfg.dtype, device=model_cfg.device, cache_dir=model_cfg.cache_dir))
    cuda = loaded.device.type == "cuda"
    check_against_base(spec, linear_names(loaded.model), max_lora_rank, cuda, base=loaded.model)
    shape = BaseShape.of(loaded.model)  # before PEFT wraps the modules
    tok, model = loaded.tokenizer, loaded.model

    # -- the data, the plan ------------------------------------------------------------
    train_raw = read_examples(spec.train, "train")
    fmt = detect_format(train_raw, "train")
    valid_raw, held_out = [], False
    if spec.validation:
        valid_raw = read_examples(spec.validation, "validation")
        valid_fmt = detect_format(valid_raw, "validation")
    else:
        count = auto.holdout_for(len(train_raw), spec.hyperparameters.validation_fraction)
        train_raw, valid_raw = hold_out(train_raw, count, spec.hyperparameters.seed)
        valid_fmt, held_out = fmt, bool(valid_raw)
    answers = [p.reference for p in quality.example_prompts(train_raw, fmt, tok, "train", n=32)]
    resolved = auto.resolve(spec.hyperparameters, spec.method, len(train_raw), loaded.model.config.hidden_size, bool(valid_raw),
                            held_out_fraction=len(valid_raw) / (len(train_raw) + len(valid_raw)) if held_out else 0.0, cuda=cuda)
    hp = resolved.hp
    soft_text = spec.method not in auto.LORA_METHODS and hp.virtual_tokens_init == "text"
    if soft_text and not hp.prompt_tuning_init_text:
        hp.prompt_tuning_init_text = init_text(answers, tok, hp.num_virtual_tokens)
        resolved.automatic = sorted({*resolved.automatic, "prompt_tuning_init_text"})

    def tokenized(examples: list[dict], f: str, name: str) -> list[dict]:
        data = tokenize(examples, f, tok, hp.max_seq_len, hp.train_on_prompt, name)
        for w in data.warnings:
            store.add_event(job.id, "warning", {"message": w})
        return data.examples

    train = tokenized(train_raw, fmt, "train")
    valid = tokenized(valid_raw, valid_fmt, "validation") if valid_raw else None

    # -- the base's own behaviour: replay rows, and the "before" samples ----------------
    cache = BaseAnswers.for_base(job_dir.parent / "base-answers", loaded.fingerprint, quantization, str(loaded.dtype))
    replay = []
    if hp.base_protection != "none":
        prompts = pick_prompts(replay_rows_for(len(train), hp.replay_ratio), _prompt_texts(train_raw), hp.seed)
        replay = replay_examples(cache.get(model, tok, prompts), tok, hp.base_protection)
    sample_prompts = (quality.example_prompts(valid_raw, valid_fmt, tok, "validation") if valid_raw
                      else quality.example_prompts(train_raw, fmt, tok, "train")) + quality.control_prompts(tok)
    controls = [p for p in sample_prompts if p.kind == "control"]
    control_before = cache.get(model, tok, [p.shown for p in controls])
    before = quality.generate(model, tok, [p for p in sample_prompts if p.kind != "control"]) + [control_before[p.shown] for p in controls]
    base_top1 = quality.top1(model, controls, [control_before[p.shown] for p in controls])
    if not any(e.kind == "samples" for e in store.events(job.id)):  # a resumed job showed them already
        store.add_event(job.id, "samples", {"stage": "before", "samples": [
            {"kind": p.kind, "prompt": p.shown, "reference": p.reference, "before": tok.decode(a.ids, skip_special_tokens=True)}
            for p, a in zip(sample_prompts, before)]})
    fit.stop_check(store, job, worker, stop)

    # -- train ---------------------------------------------------------------------------
    if quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    set_seed(hp.seed)  # the adapter's initial weights too: the same job gives the same adapter
    model = wrap(model, peft_config(spec.method, hp, loaded))
    if soft_text and spec.method == "prefix_tuning":
        init_prefix_from_text(model, tok, hp.prompt_tuning_init_text)
    elif soft_text and spec.method == "p_tuning":
        init_prompt_encoder_from_text(model, tok, hp.prompt_tuning_init_text)
    rows = train + replay
    steps_per_epoch, total, every = fit.schedule(len(rows), hp, bool(valid))
    plan = {"hyperparameters": {k: v for k, v in dataclasses.asdict(hp).items() if auto.applies(k, spec.method)}, "automatic": resolved.automatic, "train_examples": len(train),
            "validation_examples": len(valid or []), "validation_held_out": held_out, "replay_examples": len(replay),
            "steps_per_epoch": steps_per_epoch}
    args = fit.training_arguments(hp, job_dir, loaded, total, every, bool(valid), prediction_loss_only=True)
    progress = Progress(store, job, worker, stop)
    callbacks = fit.callbacks_for(progress, hp, bool(valid))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trainer = PreservingTrainer(model=model, args=args, train_dataset=rows, eval_dataset=valid, data_collator=Collator(pad), callbacks=callbacks,
                                kl_weight=hp.kl_weight if "kl" in hp.base_protection else 0.0,
                                virtual_tokens=hp.num_virtual_tokens if spec.method in ("prompt_tuning", "p_tuning") else 0)
    fit.train(trainer, progress, callbacks, store, job, worker, total, plan, job_dir)

    # -- what it learned, what it changed ------------------------------------------------
    train_loss = trainer.evaluate(eval_dataset=train[:TRAIN_LOSS_ROWS], metric_key_prefix="train")["train_loss"]
    if not math.isfinite(train_loss):
        # Said here, naming the likely cause: registration would refuse the NaN weights as a bad
        # "source_uri", a field the caller never gave.
        raise InvalidArgument(f"training diverged: the loss on the training examples is {train_loss} with learning rate "
                              f"{hp.learning_rate:g}; lower it (or leave it unset for the automatic one)", field="hyperparameters.learning_rate")
    eval_loss = trainer.state.best_metric if valid else None
    after = quality.generate(model, tok, sample_prompts)
    agreement = quality.agreement(base_top1, quality.top1(model, controls, [control_before[p.shown] for p in controls]))
    report = quality.report(sample_prompts, before, after, tok, agreement, train_loss, eval_loss).to_dict()
    store.add_event(job.id, "samples", {"stage": "after", "samples": report["samples"]})

    final = job_dir / "adapter"
    model.save_pretrained(final)  # the best checkpoint when there is a validation set (load_best_model_at_end)
    record = fit.register(registry, store, job, worker, spec.adapter_name, final, lambda p: load_adapter(p, p.name, shape, max_lora_rank),
                          loaded, quantization, {**spec.labels, "method": spec.method}, plan)
    store.add_event(job.id, "report", report)
    store.set_state(job.id, worker, "succeeded", adapter_id=record.id, trained_tokens=trainer.state.num_input_tokens_seen, quality=report)


def _prompt_texts(examples: list[dict]) -> list[str]:
    """What the training data asks (user turns, prompts, instructions): replay leaves these to the task."""
    out = []
    for ex in examples:
        out += [m["content"] for m in ex.get("messages", []) if m.get("role") == "user"]
        out += [ex[k] for k in ("prompt", "instruction") if ex.get(k)]
    return out
