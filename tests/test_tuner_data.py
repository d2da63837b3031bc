"""Training data and the job store, without a model: formats, masks, bad input, claims."""
from __future__ import annotations

import json
import threading
import time

import pandas as pd
import pytest

from conftest import tiny_tokenizer
from hotswap.server.errors import AdapterIncompatible, InvalidArgument, NotFound
from hotswap.tuner.data import detect_format, read_examples, tokenize
from hotswap.tuner.jobs import JobStore
from hotswap.tuner import auto
from hotswap.tuner.spec import Hyperparameters, TrainSpec, check_against_base

TOK = tiny_tokenizer()
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who are you"},
                     {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "and"},
                     {"role": "assistant", "content": "the dog"}]}


def learned_text(example: dict) -> list[str]:
    """The text of each run of label tokens."""
    runs, cur = [], []
    for t, lab in zip(example["input_ids"], example["labels"]):
        if lab != -100:
            cur.append(t)
        elif cur:
            runs.append(TOK.decode(cur))
            cur = []
    if cur:
        runs.append(TOK.decode(cur))
    return runs


def test_each_format_takes_loss_on_its_completion_with_eos():
    eos = TOK.eos_token
    cases = [
        ({"prompt": "who are you", "completion": " the fox"}, [" the fox" + eos]),
        ({"instruction": "name an animal", "input": "", "output": "the dog"}, ["the dog" + eos]),
        ({"instruction": "name an animal", "input": "small", "output": "the cat"}, ["the cat" + eos]),
        ({"text": "the quick brown fox"}, ["the quick brown fox" + eos]),
        (CHAT, ["the fox<|im_end|>\n", "the dog<|im_end|>\n"]),  # assistant turns only, end-of-turn (= EOS) included
    ]
    for example, want in cases:
        fmt = detect_format([example], "train")
        out = tokenize([example], fmt, TOK, 512, train_on_prompt=False, field_name="train")
        assert learned_text(out.examples[0]) == want, fmt
        full = tokenize([example], fmt, TOK, 512, train_on_prompt=True, field_name="train").examples[0]
        assert full["labels"] == full["input_ids"]
    # the chat rendering is exactly what the server renders for a request
    ids = tokenize([CHAT], "messages", TOK, 512, False, "train").examples[0]["input_ids"]
    assert TOK.decode(ids) == TOK.apply_chat_template(CHAT["messages"], tokenize=False)


def test_truncation_warns_and_refuses_when_nothing_is_left():
    long = {"prompt": "the quick brown fox " * 20, "completion": " jumps"}
    short = {"prompt": "a", "completion": " b"}
    out = tokenize([long, short], "prompt_completion", TOK, 16, False, "train")
    assert len(out.examples) == 1 and "truncated" in out.warnings[0] and "dropped" in out.warnings[0]
    with pytest.raises(InvalidArgument, match="max_seq_len") as e:
        tokenize([long], "prompt_completion", TOK, 16, False, "train")
    assert e.value.field == "train"


def test_files_are_read_with_datasets_and_bad_files_name_the_line(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        assert read_examples({"uri": str(tmp_path / name)}, "train") == rows
    assert read_examples({"uri": (tmp_path / "d.jsonl").as_uri()}, "train") == rows  # fsspec URL

    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(InvalidArgument, match="line 2") as e:
        read_examples({"uri": str(tmp_path / "bad.jsonl")}, "train")
    assert e.value.field == "train.uri"
    with pytest.raises(InvalidArgument, match="no data file"):
        read_examples({"uri": str(tmp_path / "absent.jsonl")}, "train")
    with pytest.raises(InvalidArgument, match="unknown data file type"):
        read_examples({"uri": str(tmp_path / "d.txt")}, "train")
    with pytest.raises(InvalidArgument, match="empty"):
        read_examples({"inline": []}, "train")
    with pytest.raises(InvalidArgument, match="example 2 lacks completion"):
        detect_format([rows[0], {"prompt": "x"}], "train")
    with pytest.raises(InvalidArgument, match="expected one of"):
        detect_format([{"question": "x", "answer": "y"}], "train")


def test_spec_defaults_and_checks():
    spec = TrainSpec.from_dict({"adapter_name": "bot", "method": "lora", "train": {"inline": [{"text": "x"}]}, "hyperparameters": {}})
    hp = spec.hyperparameters
    assert (hp.lora_r, hp.lora_dropout, hp.target_modules) == (16, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"])
    # unset = automatic (decided when the job starts); the optional fields keep an explicit 0
    assert (hp.learning_rate, hp.epochs, hp.batch_size, hp.lora_alpha, hp.base_protection) == (0.0, 0, 0, 0.0, "")
    assert hp.early_stopping_patience is None and hp.validation_fraction is None
    explicit = Hyperparameters.from_dict({"early_stopping_patience": 0, "validation_fraction": 0.0, "epochs": 0})
    assert (explicit.early_stopping_patience, explicit.validation_fraction, explicit.epochs) == (0, 0.0, 0)
    for d, field in [({"method": "dora"}, "method"), ({"adapter_name": "../x"}, "adapter_name"),
                     ({"hyperparameters": {"lora_dropout": 1.5}}, "hyperparameters.lora_dropout"), ({"train": {}}, "train"),
                     ({"hyperparameters": {"base_protection": "ewc"}}, "hyperparameters.base_protection"),
                     ({"hyperparameters": {"validation_fraction": 0.9}}, "hyperparameters.validation_fraction"),
                     ({"hyperparameters": {"virtual_tokens_init": "vocab"}}, "hyperparameters.virtual_tokens_init")]:
        with pytest.raises(InvalidArgument) as e:
            TrainSpec.from_dict({"adapter_name": "bot", "method": "lora", "train": {"inline": [{"text": "x"}]}, **d})
        assert e.value.field == field
    big = TrainSpec.from_dict({"adapter_name": "b", "method": "lora", "train": {"uri": "x.jsonl"}, "hyperparameters": {"lora_r": 128}})
    with pytest.raises(AdapterIncompatible, match="maximum LoRA rank 64"):
        check_against_base(big, {"q_proj", "v_proj"}, 64)
    odd = TrainSpec.from_dict({"adapter_name": "b", "method": "lora", "train": {"uri": "x.jsonl"}, "hyperparameters": {"target_modules": ["qkv"]}})
    with pytest.raises(AdapterIncompatible, match="absent from the base model: qkv") as e:
        check_against_base(odd, {"q_proj", "v_proj"}, 64)
    assert e.value.field == "hyperparameters.target_modules"


def test_job_store_claims_each_job_once_and_requeues_stalled_ones(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = [store.create(f"a{i}", "lora", {"i": i}).id for i in range(6)]
    claimed: dict[str, list[str]] = {}

    def worker(name: str) -> None:
        mine = claimed.setdefault(name, [])
        own = JobStore(tmp_path / "jobs.sqlite")  # its own connection, as another process would have
        while (job := own.claim(name)) is not None:
            mine.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [j for js in claimed.values() for j in js]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))

    # a worker that stops reporting loses its job to the next claim, which resumes it
    store = JobStore(tmp_path / "other.sqlite")
    stalled = store.create("s", "lora", {}).id
    job = store.claim("dead")
    assert job.id == stalled and job.state == "validating"
    assert store.claim("alive", stale_after=60) is None
    time.sleep(0.05)
    again = store.claim("alive", stale_after=0.01)
    assert again.id == stalled and again.attempts == 2
    assert not store.update(stalled, "dead", step=3)  # the old worker's reports are ignored
    kinds = [(e.kind, e.payload.get("state")) for e in store.events(stalled)]
    assert kinds == [("state", "queued"), ("state", "validating"), ("warning", None), ("state", "queued"), ("state", "validating")]


def test_cancel_paging_and_counts(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    a, b = store.create("a", "lora", {}), store.create("b", "lora", {})
    assert store.request_cancel(a.id).state == "cancelled"
    claimed = store.claim("w")
    assert claimed.id == b.id
    assert store.request_cancel(b.id).cancel_requested and not store.update(b.id, "w")  # the worker sees it at its next report
    page, token = store.list(page_size=1)
    assert [j.id for j in page] == [b.id] and token
    assert [j.id for j in store.list(page_size=1, page_token=token)[0]] == [a.id]
    assert [j.id for j in store.list(state="cancelled")[0]] == [a.id]
    assert store.counts_by_state()["cancelled"] == 1 and store.counts_by_state()["validating"] == 1
    with pytest.raises(NotFound):
        store.get("job-nope")
    with pytest.raises(InvalidArgument):
        store.list(page_token="junk")


def test_automatic_hyperparameters_follow_the_documented_rule():
    # epochs: OpenAI's rule (3; ~100 example visits for small sets; ~25,000 at most for large ones)
    assert [auto.epochs_for(n) for n in (4, 10, 33, 34, 40, 8333, 8334, 100_000)] == [25, 10, 4, 3, 3, 3, 2, 1]
    # batch: ~n/10 as a power of two, 1..16
    assert [auto.batch_size_for(n) for n in (1, 6, 15, 40, 100, 10_000)] == [1, 1, 2, 4, 8, 16]
    # LoRA learning rate scales with 1/width (2e-4 at 4096), bounded; soft prompts are per method
    assert auto.learning_rate_for("lora", 4096) == pytest.approx(2e-4) and auto.learning_rate_for("qlora", 8192) == pytest.approx(1e-4)
    assert auto.learning_rate_for("lora", 576) == pytest.approx(2e-4 * 4096 / 576) and auto.learning_rate_for("lora", 64) == 2e-3
    assert auto.learning_rate_for("prefix_tuning", 64) == auto.learning_rate_for("prefix_tuning", 4096)
    # hold-out: only for sets large enough, bounded
    assert [auto.holdout_for(n, None) for n in (6, 49, 50, 400, 10_000)] == [0, 0, 5, 40, 200]
    assert auto.holdout_for(400, 0.0) == 0 and auto.holdout_for(400, 0.25) == 100

    given = Hyperparameters.from_dict({"learning_rate": 5e-4, "epochs": 2, "base_protection": "none", "early_stopping_patience": 0})
    r = auto.resolve(given, "lora", 40, 576, has_validation=True)
    assert (r.hp.learning_rate, r.hp.epochs, r.hp.base_protection, r.hp.early_stopping_patience) == (5e-4, 2, "none", 0)
    assert r.hp.batch_size == 4 and r.hp.lora_alpha == 32.0 and r.hp.warmup_ratio == 0.03
    assert {"batch_size", "lora_alpha", "warmup_ratio"} <= set(r.automatic)
    assert not {"learning_rate", "epochs", "base_protection", "early_stopping_patience"} & set(r.automatic)
    # QLoRA's recipe: paged 8-bit AdamW with CUDA, the same 8-bit AdamW unpaged on CPU; others AdamW
    assert [auto.resolve(Hyperparameters(), m, 40, 576, False, cuda=c).hp.optim for m, c in
            [("qlora", True), ("qlora", False), ("lora", True), ("prompt_tuning", False)]] == \
        ["paged_adamw_8bit", "adamw_8bit", "adamw_torch", "adamw_torch"]
    paged = TrainSpec.from_dict({"adapter_name": "q", "method": "qlora", "train": {"uri": "x.jsonl"}, "hyperparameters": {"optim": "paged_adamw_8bit"}})
    check_against_base(paged, {"q_proj", "k_proj", "v_proj", "o_proj"}, 64, cuda=True)
    with pytest.raises(AdapterIncompatible, match="use adamw_8bit") as e:
        check_against_base(paged, {"q_proj", "k_proj", "v_proj", "o_proj"}, 64, cuda=False)
    assert e.value.field == "hyperparameters.optim"
    assert [auto.resolve(Hyperparameters(), m, 40, 576, False).hp.base_protection for m in ("lora", "p_tuning", "prefix_tuning")] == \
        ["kl", "kl", "replay"]
    soft = auto.resolve(Hyperparameters.from_dict({}), "prefix_tuning", 6, 576, has_validation=False).hp
    assert (soft.epochs, soft.batch_size, soft.early_stopping_patience) == (17, 1, 0) and soft.learning_rate == auto.LR_SOFT["prefix_tuning"]


def test_a_store_from_before_the_plan_and_quality_columns_is_upgraded(tmp_path):
    import sqlite3

    db = tmp_path / "old.sqlite"
    old_schema = """CREATE TABLE jobs (id TEXT PRIMARY KEY, adapter_name TEXT NOT NULL, method TEXT NOT NULL, state TEXT NOT NULL,
        spec TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION,
        estimated_finish_at DOUBLE PRECISION, error_code TEXT NOT NULL DEFAULT '', error_message TEXT NOT NULL DEFAULT '',
        trained_tokens BIGINT NOT NULL DEFAULT 0, adapter_id TEXT NOT NULL DEFAULT '', step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER NOT NULL DEFAULT 0, worker TEXT NOT NULL DEFAULT '', heartbeat_at DOUBLE PRECISION,
        cancel_requested INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0)"""
    with sqlite3.connect(db) as conn:
        conn.execute(old_schema)
        conn.execute("INSERT INTO jobs (id, adapter_name, method, state, spec, created_at) VALUES ('job-old', 'a', 'lora', 'succeeded', '{}', 1)")
    store = JobStore(db)
    old = store.get("job-old")
    assert old.plan is None and old.quality is None
    JobStore(db)  # opening it again (another process) changes nothing
    job = store.create("b", "lora", {})
    store.claim("w")
    store.set_state(job.id, "w", "running", plan={"automatic": ["epochs"]})
    store.set_state(job.id, "w", "succeeded", quality={"train_loss": 0.5})
    done = store.get(job.id)
    assert done.plan == {"automatic": ["epochs"]} and done.quality == {"train_loss": 0.5}


def test_replay_rule_and_prompt_choice():
    from hotswap.tuner.general_prompts import CONTROL, REPLAY
    from hotswap.tuner.replay import MIN_ROWS, pick_prompts, replay_rows_for

    assert not set(REPLAY) & set(CONTROL) and len(set(REPLAY)) == len(REPLAY) >= 150
    assert not [p for p in REPLAY + CONTROL if "who are you" in p.lower() or "your name" in p.lower()]
    assert [replay_rows_for(n) for n in (1, 40, 100, 10_000)] == [MIN_ROWS, 40, 100, len(REPLAY)]
    assert replay_rows_for(40, ratio=0.5) == 20 and replay_rows_for(40, ratio=3) == 120
    picked = pick_prompts(30, ["what is the capital of japan", "Tell me a JOKE!"], seed=1)
    assert len(picked) == len(set(picked)) == 30 and picked == pick_prompts(30, ["what is the capital of japan", "Tell me a JOKE!"], seed=1)
    everything = pick_prompts(1000, ["What is the capital of Japan?", "tell me a joke"], seed=1)
    assert len(everything) == len(REPLAY) - 2 and "Tell me a joke." not in everything


def test_sample_prompts_of_each_format_end_before_the_answer():
    from hotswap.tuner.quality import example_prompts

    cases = [
        ({"prompt": "who are you\n", "completion": " the fox"}, "who are you\n", "the fox"),
        ({"instruction": "name an animal", "input": "small", "output": "the cat"}, "name an animal\nsmall", "the cat"),
        ({"text": "the quick brown fox jumps over the lazy dog"}, "the quick brown", "fox jumps over the lazy dog"),
        (CHAT, "and", "the dog"),
    ]
    for example, shown, reference in cases:
        fmt = detect_format([example], "train")
        (p,) = example_prompts([example], fmt, TOK, "validation")
        assert (p.kind, p.shown, p.reference) == ("validation", shown, reference), fmt
        full = tokenize([example], fmt, TOK, 512, False, "train").examples[0]["input_ids"]
        assert full[:len(p.ids)] == p.ids and TOK.decode(full[len(p.ids):]).strip().startswith(reference)


def test_classifier_metrics_match_their_definitions_and_weights_balance_the_classes():
    from hotswap.tuner.classify_data import balanced_weights, classes, label_names_for, stratified_hold_out
    from hotswap.tuner.classify_metrics import scores

    # 3 labels; label 2 is never predicted (precision 0 by sklearn's zero_division=0)
    s = scores([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, 0], ["a", "b", "c"])
    assert s.confusion == [[2, 1, 0], [0, 2, 0], [1, 0, 0]] and s.accuracy == pytest.approx(4 / 6)
    p = [2 / 3, 2 / 3, 0.0]
    r = [2 / 3, 1.0, 0.0]
    f = [2 * x * y / (x + y) if x + y else 0.0 for x, y in zip(p, r)]
    assert s.precision == pytest.approx(sum(p) / 3) and s.recall == pytest.approx(sum(r) / 3) and s.f1 == pytest.approx(sum(f) / 3)
    assert [x["support"] for x in s.per_label] == [3, 2, 1]
    # sklearn's "balanced": n / (k * count); each class then weighs the same in total
    w = balanced_weights([0, 0, 0, 1, 2, 2], 4)
    assert w[:3] == pytest.approx([6 / 12, 6 / 4, 6 / 8]) and w[3] == 1.0  # a label with no example: 1.0
    assert label_names_for(["10", "9", "2"]) == ["2", "9", "10"] and label_names_for(["b", "a", "10"]) == ["10", "a", "b"]
    assert classes(["yes", "no", "1"], ["no", "yes"]) == (["no", "yes"], [1, 0, 1])  # a label may be its index
    with pytest.raises(InvalidArgument, match="example 3 has label 'maybe'"):
        classes(["yes", "no", "maybe"], ["no", "yes"])
    with pytest.raises(InvalidArgument, match="at least 2"):
        classes(["yes", "yes"], [])
    labels = ["a"] * 40 + ["b"] * 10
    keep, held = stratified_hold_out(labels, labels, 5, seed=1)
    assert sorted(labels[i] for i in held) == ["a"] * 4 + ["b"] and len(keep) == 45
