"""Tuner training throughput against a plain PEFT + transformers Trainer script on the
same data, in one run on one machine, on the default model; and the wall time of a
LoRA job with default hyperparameters.

    python bench/bench_tuner.py              # 2 rounds; --rounds 3

The data is the acceptance identity set (clients/python/examples/identity_data.py, 40
chat examples) plus the tuner's replay rows: the base's own answers to the built-in
general prompts, chosen exactly as a job chooses them. Both sides train every row, and
replay tokens count as trained tokens on both sides (non-padding tokens seen).

- script: what a user would write — get_peft_model + Trainer with the values the tuner's
  automatic rule picks (same lr, epochs, batch, warmup, r, alpha, targets, dtype, seed,
  so the same batches), plain cross-entropy on every row (a plain script has no KL
  term, so the replay rows take the ordinary loss), no checkpoints, no reporting.
- tuner: a real job with DEFAULT hyperparameters through the worker's own code path (job
  store, progress events, checkpoints, the KL-to-base term, samples, report, registration).
Training time on both sides is the optimizer loop alone (the job: from its "running"
event to its last step). The job's wall time (claimed → succeeded) and its phases are
reported beside it: the first job on a base also generates and caches the base's answers.
Appends a section to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments, set_seed

from hotswap.server.adapters.registry import AdapterRegistry
from hotswap.server.config import ModelConfig
from hotswap.server.model.loader import load_base_model
from hotswap.tuner import auto
from hotswap.tuner.data import detect_format, tokenize
from hotswap.tuner.jobs import JobStore
from hotswap.tuner.objective import Collator
from hotswap.tuner.replay import BaseAnswers, pick_prompts, replay_examples, replay_rows_for
from hotswap.tuner.spec import Hyperparameters, TrainSpec
from hotswap.tuner.train import run_job

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "clients" / "python" / "examples"))
from identity_data import examples  # noqa: E402


def script(loaded_cfg: ModelConfig, rows: list[dict], hp: Hyperparameters, out: Path) -> tuple[float, int]:
    """The plain PEFT + Trainer script. (seconds in trainer.train(), tokens trained)."""
    loaded = load_base_model(loaded_cfg)  # the same loader, so the same dtype and device as the job
    set_seed(hp.seed)
    model = get_peft_model(loaded.model, LoraConfig(task_type="CAUSAL_LM", r=hp.lora_r, lora_alpha=hp.lora_alpha,
                                                    lora_dropout=hp.lora_dropout, target_modules=hp.target_modules))
    steps = math.ceil(len(rows) / hp.batch_size) * hp.epochs
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=hp.batch_size, num_train_epochs=hp.epochs,
                             learning_rate=hp.learning_rate, warmup_steps=int(hp.warmup_ratio * steps), lr_scheduler_type="linear",
                             logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=hp.seed, data_seed=hp.seed,
                             remove_unused_columns=False, use_cpu=loaded.device.type == "cpu", include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=Collator(loaded.tokenizer.pad_token_id))
    t0 = time.monotonic()
    trainer.train()
    return time.monotonic() - t0, trainer.state.num_input_tokens_seen


def job(cfg: ModelConfig, rows: list[dict], work: Path, i: int) -> dict:
    """A real job with default hyperparameters; its timings from its own events."""
    store = JobStore(work / "jobs.sqlite")
    reg = AdapterRegistry(work / "registry.sqlite", work / "store")
    spec = TrainSpec.from_dict({"adapter_name": f"bench-{i}", "method": "lora", "train": {"inline": rows}}).to_dict()
    store.create(f"bench-{i}", "lora", spec)
    claimed = store.claim("bench")
    run_job(claimed, store, "bench", reg, cfg, 64, work / "jobs")
    done = store.get(claimed.id)
    assert done.state == "succeeded", done.error_message
    ev = store.events(claimed.id)
    at = {e.payload.get("state", e.kind) if e.kind == "state" else e.kind + e.payload.get("stage", ""): e.time for e in ev}
    last_step = max(e.time for e in ev if e.kind == "step")
    return {"train_s": last_step - at["running"], "tokens": done.trained_tokens, "wall_s": done.finished_at - done.started_at,
            "before_train_s": at["running"] - at["validating"], "after_train_s": at["succeeded"] - last_step, "plan": done.plan}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hotswap-bench-tuner-"))
    cfg = ModelConfig()
    load_avg = [Path("/proc/loadavg").read_text().split()[0]]

    # the rows a default job trains: the examples and its replay rows (the cold job below fills the cache)
    jobs = [job(cfg, examples(), work, 0)]
    loaded = load_base_model(cfg)
    tok, rows = loaded.tokenizer, examples()
    hp = dataclasses.replace(Hyperparameters(), **{k: v for k, v in jobs[0]["plan"]["hyperparameters"].items()})
    resolved = auto.resolve(Hyperparameters(), "lora", len(rows), loaded.model.config.hidden_size, False).hp
    assert all(getattr(resolved, k) == v for k, v in jobs[0]["plan"]["hyperparameters"].items())
    train = tokenize(rows, detect_format(rows, "train"), tok, hp.max_seq_len, False, "train").examples
    cache = BaseAnswers.for_base(work / "jobs" / "base-answers", loaded.fingerprint, "none", str(loaded.dtype))
    prompts = pick_prompts(replay_rows_for(len(train), hp.replay_ratio), [r["messages"][0]["content"] for r in rows], hp.seed)
    replay = replay_examples(cache.get(loaded.model, tok, prompts), tok, "replay")  # cached by the job: no generation here
    dtype = str(loaded.dtype).replace("torch.", "")
    del loaded

    base, ours = [], []
    for i in range(args.rounds):
        secs, tokens = script(cfg, train + replay, hp, work / f"script-{i}")
        base.append(tokens / secs)
        jobs.append(j := job(cfg, examples(), work, i + 1))
        ours.append(j["tokens"] / j["train_s"])
        assert j["tokens"] == tokens, (j["tokens"], tokens)  # the same rows on both sides
    load_avg.append(Path("/proc/loadavg").read_text().split()[0])
    b, o = statistics.median(base), statistics.median(ours)
    cold, warm = jobs[0], statistics.median([j["wall_s"] for j in jobs[1:]])
    p = jobs[0]["plan"]
    phases = lambda j: f"{j['before_train_s']:.1f} s before training, {j['train_s']:.1f} s training, {j['after_train_s']:.1f} s after"  # noqa: E731
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    text = (
        f"\n## {time.strftime('%Y-%m-%d %H:%M')} — tuner v2: default LoRA job on the identity set, throughput against a plain PEFT + Trainer script\n\n"
        f"`python bench/bench_tuner.py --rounds {args.rounds}` on {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, default model in {dtype} (dtype auto), load average {load_avg[0]} at the start, {load_avg[1]} at the end\n\n"
        f"Rows: {p['train_examples']} examples + {p['replay_examples']} replay rows; automatic hyperparameters: "
        + ", ".join(f"{k} {p['hyperparameters'][k]:.3g}" if isinstance(p['hyperparameters'][k], float) else f"{k} {p['hyperparameters'][k]}"
                    for k in ("learning_rate", "epochs", "batch_size", "warmup_ratio", "base_protection", "kl_weight"))
        + f"; {p['steps_per_epoch'] * p['hyperparameters']['epochs']} steps, {jobs[1]['tokens']} tokens per run.\n\n"
        "| path | tokens/s (median) | rounds |\n|---|---|---|\n"
        f"| PEFT + Trainer script (cross-entropy on every row, no checkpoints, no reporting) | {b:.0f} | {' / '.join(f'{x:.0f}' for x in base)} |\n"
        f"| hotswap tuner job (KL-to-base on replay rows, logits only where a loss is taken, events, checkpoints) | {o:.0f} | "
        f"{' / '.join(f'{x:.0f}' for x in ours)} |\n\n"
        f"Job wall time, claimed → succeeded: first job on this base (generates and caches the base's answers) {cold['wall_s']:.1f} s "
        f"({phases(cold)}); later jobs (median) {warm:.1f} s ({phases(jobs[-1])}).\n\n"
        "| target | measured | goal | met / NOT met |\n|---|---|---|---|\n"
        f"| tuner throughput / plain PEFT + Trainer | {o / b:.2f}× | ≥ 1.0× | {met(o / b >= 1.0)} |\n"
        f"| LoRA job wall time, default hyperparameters (later jobs) | {warm:.1f} s | ≤ 60 s | {met(warm <= 60)} |\n"
        f"| LoRA job wall time, first job on a fresh server | {cold['wall_s']:.1f} s | ≤ 60 s | {met(cold['wall_s'] <= 60)} |\n"
    )
    print(text)
    with args.out.open("a") as f:
        f.write(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
