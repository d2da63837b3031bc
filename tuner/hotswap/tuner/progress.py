"""A running job's reports: Trainer events become job events (steps, evals, checkpoints)
and job fields (step, ETA, tokens), and the job's heartbeat keeps it claimed. A cancel or
a stopping worker is noticed here, at the end of a step."""
from __future__ import annotations

import threading
import time

from transformers import TrainerCallback

from .jobs import Job, JobStore

CLASSIFIER_METRICS = ("accuracy", "precision", "recall", "f1")


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
            scores = {k: float(metrics[f"eval_{k}"]) for k in CLASSIFIER_METRICS if f"eval_{k}" in metrics}  # classifiers only
            self.store.add_event(self.job.id, "eval", {"step": state.global_step, "eval_loss": float(metrics["eval_loss"]),
                                                       "epoch": float(state.epoch or 0), **scores})

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
