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
from hotswap.tuner.spec import TrainSpec, check_against_base

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
    assert (hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.target_modules) == (16, 32.0, 0.05, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert hp.lr("lora") == 2e-4 and hp.lr("prompt_tuning") == 3e-2
    for d, field in [({"method": "dora"}, "method"), ({"adapter_name": "../x"}, "adapter_name"),
                     ({"hyperparameters": {"lora_dropout": 1.5}}, "hyperparameters.lora_dropout"), ({"train": {}}, "train")]:
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
