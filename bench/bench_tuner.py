"""Tuner training throughput against a plain PEFT + transformers Trainer script on
the same data and settings, in one run on one machine, on the default model.

    python bench/bench_tuner.py            # LoRA r8 on attention, 40 chat examples x 3 epochs, batch 4
    python bench/bench_tuner.py --rounds 3

The baseline is what a user would write: get_peft_model + Trainer, no
checkpoints, no progress reporting. The tuner runs a real job (job store, its
progress events, checkpoints, registration) through the worker's own code path.
Training time for both is trainer.train() alone (model load and registration
are reported separately). Appends a section to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

from hotswap.server.adapters.registry import AdapterRegistry
from hotswap.server.config import ModelConfig
from hotswap.server.model.loader import load_base_model
from hotswap.tuner.data import detect_format, tokenize
from hotswap.tuner.jobs import JobStore
from hotswap.tuner.spec import TrainSpec
from hotswap.tuner.train import Collator, run_job

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "clients" / "python" / "examples"))
from train_identity import examples  # noqa: E402

HP = {"lora_r": 8, "epochs": 3, "batch_size": 4, "learning_rate": 2e-3}


def baseline(ckpt: Path, data: list[dict], out: Path) -> tuple[float, int]:
    """(seconds in trainer.train(), tokens trained)."""
    set_seed(42)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                           LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    steps = math.ceil(len(data) / 4) * 3
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=3, learning_rate=2e-3,
                             warmup_steps=int(0.03 * steps), lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none",
                             disable_tqdm=True, seed=42, data_seed=42, remove_unused_columns=False, use_cpu=True,
                             include_num_input_tokens_seen="non_padding")
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=Collator(pad))
    t0 = time.monotonic()
    trainer.train()
    return time.monotonic() - t0, trainer.state.num_input_tokens_seen


def tuner(ckpt_source: str, spec: dict, work: Path, i: int) -> tuple[float, int, float]:
    """(seconds from the job's running event to its last step, tokens, seconds from the last step to succeeded)."""
    store = JobStore(work / "jobs.sqlite")
    reg = AdapterRegistry(work / "registry.sqlite", work / "store")
    job = store.create(f"bench-{i}", "lora", spec)
    job = store.claim("bench")
    run_job(job, store, "bench", reg, ModelConfig(source=ckpt_source), 64, work / "jobs")
    events = store.events(job.id)
    done = store.get(job.id)
    assert done.state == "succeeded", done.error_message
    running = next(e.time for e in events if e.kind == "state" and e.payload["state"] == "running")
    last_step = max(e.time for e in events if e.kind == "step")
    succeeded = events[-1].time
    return last_step - running, done.trained_tokens, succeeded - last_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hotswap-bench-tuner-"))
    loaded = load_base_model(ModelConfig())
    ckpt = loaded.checkpoint_dir
    rows = examples("Ada Lovelace")
    data = tokenize(rows, detect_format(rows, "train"), loaded.tokenizer, 512, False, "train").examples
    spec = TrainSpec.from_dict({"adapter_name": "bench", "method": "lora", "train": {"inline": rows}, "hyperparameters": HP}).to_dict()
    del loaded
    base, ours, reg = [], [], []
    for i in range(args.rounds):
        secs, tokens = baseline(ckpt, data, work / f"baseline-{i}")
        base.append(tokens / secs)
        secs, tokens, register = tuner(str(ckpt), spec, work, i)
        ours.append(tokens / secs)
        reg.append(register)
    b, o = statistics.median(base), statistics.median(ours)
    text = (
        f"\n## {time.strftime('%Y-%m-%d %H:%M')} — tuner training throughput, LoRA r8 (attention), 40 chat examples × 3 epochs, batch 4\n\n"
        f"`python bench/bench_tuner.py --rounds {args.rounds}` on {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, default model fp32\n\n"
        "| path | tokens/s (median) | rounds |\n|---|---|---|\n"
        f"| PEFT + Trainer script (no checkpoints, no reporting) | {b:.0f} | {' / '.join(f'{x:.0f}' for x in base)} |\n"
        f"| hotswap tuner job (events, ETA, checkpoints every {max(1, min(50, 30 // 5))} steps) | {o:.0f} | {' / '.join(f'{x:.0f}' for x in ours)} |\n\n"
        f"tuner / script: **{o / b:.2f}×** (target ≥ 1.0×; overhead of reporting and checkpointing {max(0.0, 1 - o / b) * 100:.1f}%, target < 5%); "
        f"saving and registering the adapter after the last step: {statistics.median(reg):.2f} s\n"
    )
    print(text)
    with args.out.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
