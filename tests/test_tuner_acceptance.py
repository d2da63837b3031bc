"""Issue 12's acceptance on the default model (SmolLM2-135M-Instruct), through a real
hotswap-server with its tuner worker and the server's default dtype: the identity set of
clients/python/examples/identity_data.py (40 chat examples) trained by every method with
DEFAULT hyperparameters. Each adapter answers held-out paraphrases with the identity
(LoRA 5 of 5, the others at least 4), answers no unrelated control question with it (served
alone; in the mixed batches an answer may leave the adapter's own only at a bf16 near-tie), and
the base model, served in the same batches, answers exactly as before any training.
One job per method, trained once for the module; the assertions share them."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hotswap.client import Client
from server_process import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python" / "examples"))
from identity_data import CONTROLS, PARAPHRASES, examples, has_identity  # noqa: E402

METHODS = ["lora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning"]
BAR = {"lora": 5}  # paraphrases (of 5) answered with the identity; every other method: 4
QUESTIONS = PARAPHRASES + CONTROLS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # five default-model jobs, trained once for the module


BF16_TIE = 0.25
"""nats: the widest gap between a model's top two tokens that batch composition may flip. The default dtype here
is bf16, whose matmuls round differently at different batch sizes, and its logits come in steps of 0.125 here, so
ties are common: base-only batches flip 5 of these 10 answers the same way, and an adapter's answer to a control
question can sit at such a tie between a plain answer and its trained identity. Exactness is the fp32 fidelity
tests' job."""


def ask(c: Client, adapter: str, **kw):
    return [c.generate(messages=[{"role": "user", "content": q}], adapter=adapter, max_new_tokens=32, **kw) for q in QUESTIONS]


def same_up_to_ties(alone, batched) -> str:
    """'' when the batched answer is the base's own, or leaves it only at a near-tie of the base alone."""
    for i, (a, b) in enumerate(zip(alone.token_ids, batched.token_ids)):
        if a != b:
            top = {t: lp for t, _, lp in alone.logprobs[i].top}
            gap = max(top.values()) - top.get(b, -float("inf"))
            return "" if gap <= BF16_TIE else f"token {i}: {b} instead of {a}, {gap:.3f} nats from the base's choice"
    return "" if alone.token_ids == batched.token_ids else "lengths differ"


@pytest.fixture(scope="module")
def trained(default_model_cache, tmp_path_factory):
    cache = default_model_cache[0]
    data = tmp_path_factory.mktemp("acceptance")
    with ServerProcess(Path("default"), data, "--model-cache-dir", str(cache), "--dtype", "auto", "--tuner-workers", "1") as srv, \
            Client(srv.target, timeout=1800) as c:
        base_alone = ask(c, "", logprobs=5)
        jobs = {m: c.train_adapter(f"nimbus-{m.replace('_', '-')}", m, examples=examples()) for m in METHODS}  # no hyperparameters
        events = {m: list(c.watch_training_job(job.id, timeout=1800)) for m, job in jobs.items()}
        done = {m: ev[-1].job for m, ev in events.items()}
        for m, job in done.items():
            assert job.state == "succeeded", (m, job.error_message)
        adapters = ["", *[done[m].adapter_id for m in METHODS]]
        alone = {m: ask(c, done[m].adapter_id, logprobs=5) for m in METHODS}  # each request alone in its batch
        with ThreadPoolExecutor(len(adapters)) as ex:  # every adapter and the base, in the same batches
            answers = dict(zip(["", *METHODS], ex.map(lambda a: ask(c, a, **({} if a else {"logprobs": 5})), adapters)))
    return {"base_alone": base_alone, "alone": alone, "answers": answers, "jobs": done, "events": events}


@pytest.mark.parametrize("method", METHODS)
def test_default_hyperparameters_teach_the_identity_and_nothing_else(trained, method):
    out = [g.text for g in trained["answers"][method]]
    hits = [has_identity(a) for a in out[:len(PARAPHRASES)]]
    assert sum(hits) >= BAR.get(method, 4), list(zip(PARAPHRASES, out))
    alone, batched = trained["alone"][method][len(PARAPHRASES):], trained["answers"][method][len(PARAPHRASES):]
    leaks = {q: a.text for q, a in zip(CONTROLS, alone) if has_identity(a.text)}
    assert not leaks, leaks
    # in the mixed batches, a leak counts unless the answer left the adapter's own only at a near-tie
    leaks = {q: (b.text, same_up_to_ties(a, b)) for q, a, b in zip(CONTROLS, alone, batched) if has_identity(b.text) and same_up_to_ties(a, b)}
    assert not leaks, leaks
    job = trained["jobs"][method]
    # nothing was given: every choice is the tuner's, recorded in the job
    assert {"learning_rate", "epochs", "batch_size", "warmup_ratio", "base_protection"} <= set(job.plan.automatic)
    assert job.plan.train_examples == 40 and job.plan.replay_examples >= 16
    # the report shows the adapter's own answers to the built-in control prompts: none has the identity either
    controls = [s for s in job.quality.samples if s.kind == "control"]
    assert controls and not [s.after for s in controls if has_identity(s.after)]


def test_base_rows_in_the_same_batch_are_unchanged(trained):
    alone, batched = trained["base_alone"], trained["answers"][""]
    diffs = {q: d for q, a, b in zip(QUESTIONS, alone, batched) if (d := same_up_to_ties(a, b))}
    assert not diffs, diffs
    assert not any(has_identity(g.text) for g in alone + batched)
