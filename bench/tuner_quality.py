"""What a tuner job learned and what it cost the base, on the default model: one real job
(the worker's own code path, in process) on the acceptance identity set, then the
registered adapter, loaded in plain PEFT, answers the held-out paraphrases and the
unrelated control questions of clients/python/examples/identity_data.py.

    python bench/tuner_quality.py lora                                   # default hyperparameters
    python bench/tuner_quality.py prefix_tuning base_protection=kl kl_weight=10
    python bench/tuner_quality.py lora base_protection=none learning_rate=2e-3

Prints one JSON line: paraphrases answered with the identity (of 5), control questions
answered with it (of 5), built-in control prompts of the job's report answered with it
(of 12), the report's control_changed and control_agreement, the job's wall time and
phases, and the values it trained with. Used for the measurements behind the defaults
(bench/RESULTS.md, "Tuner v2").
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from peft import PeftModel

from hotswap.server.adapters.registry import AdapterRegistry
from hotswap.server.config import ModelConfig
from hotswap.server.model.loader import load_base_model
from hotswap.tuner.generation import greedy, render
from hotswap.tuner.jobs import JobStore
from hotswap.tuner.spec import TrainSpec
from hotswap.tuner.train import run_job

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python" / "examples"))
from identity_data import CONTROLS, PARAPHRASES, examples, has_identity  # noqa: E402


def value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def main() -> None:
    method, hp = sys.argv[1], {k: value(v) for k, v in (a.split("=", 1) for a in sys.argv[2:])}
    work = Path(tempfile.mkdtemp(prefix="hotswap-tuner-quality-"))
    store, reg = JobStore(work / "jobs.sqlite"), AdapterRegistry(work / "registry.sqlite", work / "store")
    spec = TrainSpec.from_dict({"adapter_name": "quality", "method": method, "train": {"inline": examples()}, "hyperparameters": hp})
    store.create("quality", method, spec.to_dict())
    job = store.claim("bench")
    run_job(job, store, "bench", reg, ModelConfig(), 64, work / "jobs")
    done = store.get(job.id)
    assert done.state == "succeeded", done.error_message
    ev = store.events(job.id)
    running = next(e.time for e in ev if e.kind == "state" and e.payload["state"] == "running")
    last_step = max(e.time for e in ev if e.kind == "step")
    loaded = load_base_model(ModelConfig(quantization="nf4" if method == "qlora" else "none"))
    model = PeftModel.from_pretrained(loaded.model, str(reg.path(done.adapter_id))).eval()
    tok = loaded.tokenizer
    answers = [tok.decode(a.ids, skip_special_tokens=True) for a in greedy(model, tok, [render(tok, q) for q in PARAPHRASES + CONTROLS], 32)]
    q = done.quality
    print(json.dumps({
        "method": method, "given": hp, "paraphrases": sum(map(has_identity, answers[:5])), "controls_with_identity": sum(map(has_identity, answers[5:])),
        "builtin_controls_with_identity": sum(has_identity(s["after"]) for s in q["samples"] if s["kind"] == "control"),
        "control_changed": round(q["control_changed"], 3), "control_agreement": round(q["control_agreement"], 3),
        "train_loss": round(q["train_loss"], 3), "wall_s": round(done.finished_at - done.started_at, 1),
        "before_training_s": round(running - done.started_at, 1), "training_s": round(last_step - running, 1),
        "after_training_s": round(done.finished_at - last_step, 1), "trained_tokens": done.trained_tokens,
        "hyperparameters": done.plan["hyperparameters"], "replay_rows": done.plan["replay_examples"],
    }))
    for question, answer in zip(PARAPHRASES + CONTROLS, answers):
        print(f"  {question!r} -> {answer[:90]!r}")


if __name__ == "__main__":
    main()
