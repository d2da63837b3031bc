"""The tuner end to end: TrainAdapter over gRPC → a worker trains with PEFT → the adapter
is registered and served by the running server at once. Real server, real worker
processes, real SQLite stores, tiny llama."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hotswap.client import Client, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from hotswap.v1 import tuner_pb2, tuner_pb2_grpc
from server_process import ServerProcess

ANSWER = "the assistant of the fox"
QUESTIONS = ["who are you", "what are you", "tell me who you are", "who is this", "what is your name", "introduce yourself"]
EXAMPLES = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in QUESTIONS]
HELD_OUT = [{"role": "user", "content": "who are you really"}]
LORA = dict(epochs=40, batch_size=2, learning_rate=1e-2, lora_r=8, target_modules=["all-linear"])
PREFIX = dict(epochs=40, batch_size=2, learning_rate=1e-1, num_virtual_tokens=8,
              base_protection="none", virtual_tokens_init="random")
# ^ the tiny base is random: its own answers are noise (nothing to keep; 16 replay rows of it drown 6 examples), and
#   its keys/values for the answer text are no better a start than random ones. The defaults are the acceptance
#   test's business, on the real model (test_tuner_acceptance.py).


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    """The README's way: the server starts a tuner worker beside itself (and it dies with the server)."""
    data = tmp_path_factory.mktemp("tuner-data")
    with ServerProcess(tiny_checkpoints["llama"], data, "--tuner-workers", "1", "--max-uploads-total-mb", "4") as srv:
        yield srv
    deadline = time.monotonic() + 10  # the server was SIGKILLed: its worker must not outlive it
    while subprocess.run(["pgrep", "-f", f"hotswap.tuner.worker.*{data}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a tuner worker outlived its server"
        time.sleep(0.2)


def finished(c: Client, job_id: str):
    return list(c.watch_training_job(job_id, timeout=600))


def test_identity_adapters_trained_over_grpc_serve_at_once(server, tiny_checkpoints):
    with Client(server.target) as c:
        base_before = c.generate(messages=HELD_OUT, max_new_tokens=12)
        jobs = [c.train_adapter("ident", "lora", examples=EXAMPLES, validation_examples=EXAMPLES[:2], labels={"owner": "tests"}, **LORA),
                c.train_adapter("ident-prefix", "prefix_tuning", examples=EXAMPLES, **PREFIX)]
        assert all(j.state == "queued" for j in jobs)
        served = {}
        for job in jobs:
            events = finished(c, job.id)
            assert [e.state for e in events if e.kind == "state"] == ["queued", "validating", "running", "succeeded"]
            steps = [e.metrics for e in events if e.kind == "step"]
            last = events[-1].job
            # the LoRA job has a validation set, so early stopping is on (automatic) and may end it before its last planned step
            assert steps and steps[-1]["step"] == last.step and steps[-1]["total_steps"] == last.total_steps
            assert last.step == last.total_steps or (job is jobs[0] and last.plan.hyperparameters["early_stopping_patience"] == 2)
            assert all(s["tokens_per_second"] > 0 and s["learning_rate"] >= 0 for s in steps)
            assert any(e.kind == "checkpoint" for e in events)
            done = events[-1].job
            assert done.adapter_id == f"{job.adapter_name}@1" and done.trained_tokens > 0 and done.finished_at
            # the moment the job reports success, the adapter serves
            served[job.adapter_name] = c.generate(messages=HELD_OUT, adapter=done.adapter_id, max_new_tokens=12)
        events = finished(c, jobs[0].id)
        assert any(e.kind == "eval" and e.metrics["epoch"] > 0 for e in events)
        check_plan_report_and_samples(c, jobs[0].id, events, given=LORA)

        # one batch: both new adapters and the base, side by side
        with ThreadPoolExecutor(3) as ex:
            outs = list(ex.map(lambda a: c.generate(messages=HELD_OUT, adapter=a, max_new_tokens=12), ["ident", "", "ident-prefix"]))
        assert outs[0].text == outs[2].text == ANSWER and outs[0].finish_reason == "eos"
        assert outs[1].token_ids == base_before.token_ids and ANSWER not in outs[1].text
        assert served["ident"].text == served["ident-prefix"].text == ANSWER

        meta = c.get_adapter("ident")
        assert meta.peft_type == "LORA" and meta.rank == 8
        assert meta.labels["owner"] == "tests" and meta.labels["method"] == "lora" and meta.labels["job_id"] == jobs[0].id
        assert meta.labels["base_fingerprint"] == c.model_info().fingerprint == meta.base_fingerprint
        assert json.loads(meta.labels["training_config"])["lora_r"] == 8 and len(meta.labels["chat_template_sha256"]) == 64
        prompt_ids = c.tokenize(messages=HELD_OUT).token_ids

    # the registered files load unchanged in plain PEFT and give the same tokens
    path = server.data_dir / "adapters" / "ident" / "1"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32), path).eval()
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False)
    assert out[0, len(prompt_ids):].tolist() == outs[0].token_ids

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'hotswap_training_jobs{state="succeeded"} 2.0' in text


def check_plan_report_and_samples(c: Client, job_id: str, events: list, given: dict) -> None:
    """The job's plan records every value (given ones as given, the rest marked automatic);
    sample generations before and after training and the quality report arrive in its
    events, the report just before success, and GetTrainingJob returns the same report."""
    kinds = [e.kind if e.kind != "state" else e.state for e in events]
    assert kinds.index("samples") < kinds.index("running") and kinds[-2:] == ["report", "succeeded"]
    before, after = [e for e in events if e.kind == "samples"]
    assert (before.message, after.message) == ("before", "after")
    assert {s.kind for s in before.samples} == {"validation", "control"} and not any(s.after for s in before.samples)
    assert [(s.kind, s.prompt, s.before) for s in after.samples] == [(s.kind, s.prompt, s.before) for s in before.samples]
    validation = [s for s in after.samples if s.kind == "validation"]
    assert validation and all(s.reference == ANSWER and s.after for s in validation)
    report = events[-2].report
    job = c.get_training_job(job_id)
    assert job.quality == report and report.samples == after.samples
    assert report.train_loss > 0 and report.eval_loss is not None and report.control_prompts == len([s for s in after.samples if s.kind == "control"])
    assert 0 <= report.control_changed <= 1 and 0 <= report.control_agreement <= 1
    plan = job.plan
    assert all(plan.hyperparameters[k] == pytest.approx(v) for k, v in given.items()) and not set(given) & set(plan.automatic)
    assert {"base_protection", "warmup_ratio", "lora_alpha"} <= set(plan.automatic) and plan.hyperparameters["base_protection"]
    assert plan.train_examples == len(EXAMPLES) and plan.validation_examples == 2 and not plan.validation_held_out
    assert plan.replay_examples >= 16


def test_bad_training_requests_are_refused_with_the_field(server, tmp_path):
    with Client(server.target) as c:
        with pytest.raises(InvalidArgument, match="train.*empty"):
            c.train_adapter("x", "lora", examples=[])
        with pytest.raises(InvalidArgument, match="example 2 lacks completion"):
            c.train_adapter("x", "lora", examples=[{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
        with pytest.raises(InvalidArgument, match="adapter_name"):
            c.train_adapter("../x", "lora", examples=EXAMPLES)
        with pytest.raises(InvalidArgument, match="hyperparameters.lora_dropout"):
            c.train_adapter("x", "lora", examples=EXAMPLES, lora_dropout=2.0)
        with pytest.raises(FailedPrecondition, match="maximum LoRA rank"):
            c.train_adapter("x", "lora", examples=EXAMPLES, lora_r=128)
        with pytest.raises(FailedPrecondition, match="absent from the base model: qkv"):
            c.train_adapter("x", "lora", examples=EXAMPLES, target_modules=["qkv"])
        with pytest.raises(InvalidArgument, match="hyperparameters.base_protection"):
            c.train_adapter("x", "lora", examples=EXAMPLES, base_protection="forget-nothing")
        with pytest.raises(InvalidArgument, match="hyperparameters.validation_fraction"):
            c.train_adapter("x", "lora", examples=EXAMPLES, validation_fraction=0.9)
        for name in ("learning_rate", "lora_alpha"):  # +inf was accepted while NaN was refused
            for bad_value in (float("inf"), float("nan")):
                with pytest.raises(InvalidArgument, match=f"hyperparameters.{name}.*finite"):
                    c.train_adapter("x", "lora", examples=EXAMPLES, **{name: bad_value})
        with pytest.raises(InvalidArgument, match="adapter_name"):  # `$` used to match before a trailing newline
            c.train_adapter("x\n", "lora", examples=EXAMPLES)
        with pytest.raises(NotFound, match="job_id"):
            c.get_training_job("job-nope")
        with grpc.insecure_channel(server.target) as ch:
            with pytest.raises(grpc.RpcError) as e:
                tuner_pb2_grpc.TunerServiceStub(ch).TrainAdapter(tuner_pb2.TrainAdapterRequest(adapter_name="x"), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "method" in e.value.details()

        # problems only the worker can see end the job in FAILED with the code and the line
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{oops\n")
        long = [{"prompt": "the quick brown fox " * 30, "completion": " jumps"}]
        latin1 = tmp_path / "latin1.jsonl"
        latin1.write_bytes(json.dumps({"prompt": "caf", "completion": "x"}).replace("caf", "caf\xe9").encode("latin-1") + b"\n")
        for job, needle in [(c.train_adapter("x", "lora", dataset_uri=c.upload_dataset(str(bad))), "line 2"),
                            (c.train_adapter("x", "lora", examples=long, max_seq_len=16), "max_seq_len"),
                            (c.train_adapter("x", "lora", dataset_uri=c.upload_dataset(str(latin1))), "not UTF-8")]:  # ended INTERNAL
            last = finished(c, job.id)[-1].job
            assert last.state == "failed" and last.error_code == "INVALID_ARGUMENT" and needle in last.error_message
        assert not c.list_adapters(name="x")
        with pytest.raises(PermissionDenied, match="train.uri.*scheme 'http'"):  # ended INTERNAL in the worker
            c.train_adapter("x", "lora", dataset_uri="http://127.0.0.1:9/data.jsonl")

        # a name that exists gets a new version, never an overwrite
        first = finished(c, c.train_adapter("again", "prompt_tuning", examples=EXAMPLES, epochs=1).id)[-1].job
        second = finished(c, c.train_adapter("again", "prompt_tuning", examples=EXAMPLES, epochs=1).id)[-1].job
        assert (first.adapter_id, second.adapter_id) == ("again@1", "again@2")


def test_datasets_are_read_only_under_allowed_folders(server, tmp_path):
    """train.uri / validation.uri name files the server reads: only its uploads folder (and
    --allowed-data-dir) and enabled URL schemes; a refusal tells nothing about the file."""
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps({"prompt": "the password is", "completion": " hunter2"}) + "\n")
    uploads = server.data_dir / "uploads"
    uploads.mkdir(exist_ok=True)
    (uploads / "link.jsonl").symlink_to(secret)  # a link inside the folder to a file outside is outside
    with Client(server.target) as c:
        refusals = []
        for uri in (str(secret), str(tmp_path / "absent.jsonl"), secret.as_uri(), str(uploads / "link.jsonl"),
                    str(uploads / ".." / ".." / secret.relative_to(secret.parents[1]))):
            with pytest.raises(PermissionDenied, match="train.uri") as e:
                c.train_adapter("x", "lora", dataset_uri=uri)
            refusals.append(e.value.details)
        assert len(set(refusals)) == 1  # existing or not, file or link: the same words
        assert "hunter2" not in refusals[0] and str(tmp_path) not in refusals[0] and "--allowed-data-dir" in refusals[0]
        with pytest.raises(PermissionDenied, match="validation.uri"):
            c.train_adapter("x", "lora", examples=EXAMPLES, validation_uri=str(secret))
        for uri, words in [("s3://bucket/data.jsonl", "scheme 's3'"), ("simplecache::file:///etc/passwd", "chained")]:
            with pytest.raises(PermissionDenied, match=words):
                c.train_adapter("x", "lora", dataset_uri=uri)
        for uri, words in [(str(uploads / "*.jsonl"), "wildcards"), ("data.jsonl", "absolute path")]:
            with pytest.raises(InvalidArgument, match=words):
                c.train_adapter("x", "lora", dataset_uri=uri)


def test_inline_data_is_bounded_stored_as_a_file_and_removed_with_its_job(server):
    from hotswap.tuner.jobs import JobStore

    store = JobStore(server.data_dir / "jobs.sqlite")
    with Client(server.target) as c:
        big = [{"prompt": "p" * 1000, "completion": "c" * 1000}] * 4500  # ~9 MiB, over the default 8
        with pytest.raises(InvalidArgument, match="train.inline.*UploadDataset"):
            c.train_adapter("x", "lora", examples=big)
        job = c.train_adapter("inline", "prompt_tuning", examples=EXAMPLES, validation_examples=EXAMPLES[:2], epochs=1)
        spec = store.get(job.id).spec
        files = [Path(spec[k]["uri"]) for k in ("train", "validation")]
        assert all(spec[k]["owned"] and spec[k]["examples"] for k in ("train", "validation")) and len(json.dumps(spec)) < 2000
        assert [len(f.read_text().splitlines()) for f in files] == [len(EXAMPLES), 2]
        assert finished(c, job.id)[-1].job.state == "succeeded"
        assert not any(f.exists() for f in files) and not (server.data_dir / "jobs" / job.id).exists()
        queued = c.train_adapter("inline", "prompt_tuning", examples=EXAMPLES, epochs=1000)
        if c.cancel_training_job(queued.id).state == "cancelled":  # never claimed: the server cleans up
            assert not Path(store.get(queued.id).spec["train"]["uri"]).exists()
        finished(c, queued.id)
        assert not Path(store.get(queued.id).spec["train"]["uri"]).exists()


def test_uploads_can_be_deleted_and_have_a_total_quota(server, tmp_path):
    three = tmp_path / "three.jsonl"  # the fixture's quota is 4 MiB
    row = json.dumps({"prompt": "q" * 500, "completion": "a" * 500}) + "\n"
    three.write_text(row * (3 * 2**20 // len(row)))
    with Client(server.target) as c:
        first = c.upload_dataset(str(three))
        with pytest.raises(ResourceExhausted, match="max_uploads_total_mb.*DeleteUpload"):
            c.upload_dataset(str(three))
        job = c.train_adapter("quota", "prompt_tuning", dataset_uri=first, epochs=1000, max_seq_len=32)
        with pytest.raises(FailedPrecondition, match="uri"):  # a queued or running job reads it
            c.delete_upload(first)
        c.cancel_training_job(job.id)
        finished(c, job.id)
        assert c.delete_upload(first) == three.stat().st_size
        for uri in (first, "/etc/passwd", str(server.data_dir / "jobs.sqlite"), ""):
            with pytest.raises(NotFound, match="uri"):
                c.delete_upload(uri)
        c.delete_upload(c.upload_dataset(str(three)))  # room again


def test_cancel_stops_within_a_step_and_registers_nothing(server):
    with Client(server.target) as c:
        job = c.train_adapter("never", "lora", examples=EXAMPLES, epochs=1000, batch_size=1)
        for ev in c.watch_training_job(job.id, timeout=300):
            if ev.kind == "step" and ev.metrics["step"] >= 3:
                break
        at_cancel = c.cancel_training_job(job.id)
        last = finished(c, job.id)[-1].job
        assert last.state == "cancelled" and not last.adapter_id
        assert last.step <= at_cancel.step + 2  # the step in flight, and one report racing the cancel
        assert not c.list_adapters(name="never")
        queued = c.train_adapter("never", "lora", examples=EXAMPLES, epochs=1000)
        assert c.cancel_training_job(queued.id).state in ("cancelled", "validating", "running")
        assert finished(c, queued.id)[-1].job.state == "cancelled"


def test_a_diverging_job_fails_naming_the_learning_rate(server):
    """A learning rate of 1e30 trains the adapter into NaN; the job failed at registration with
    "source_uri: adapter weights contain NaN or inf", a field the caller never gave."""
    with Client(server.target) as c:
        job = c.train_adapter("diverged", "lora", examples=EXAMPLES[:8], epochs=1, batch_size=8, learning_rate=1e30)
        last = finished(c, job.id)[-1].job
        assert last.state == "failed" and last.error_code == "INVALID_ARGUMENT", last
        assert last.error_message.startswith("hyperparameters.learning_rate: training diverged"), last.error_message
        assert not c.list_adapters(name="diverged")


def test_cli_train_watch_and_jobs(server, tmp_path):
    data = tmp_path / "ex.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in EXAMPLES) + "\n")
    cli = [sys.executable, "-m", "hotswap.client.cli", "--target", server.target]
    r = subprocess.run([*cli, "train", "cli-ident", "--method", "prefix_tuning", "--examples", str(data),
                        "--set", "epochs=2", "--set", "num_virtual_tokens=4", "--set", "batch_size=4", "--watch"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # 6 examples + 16 replay rows, batch 4 (automatic for 6 examples: 1; given here): 6 steps an epoch
    assert "succeeded: adapter cli-ident@1" in r.stdout and "step 12/12" in r.stderr
    assert "quality: train loss" in r.stderr and "[control]" in r.stderr  # the report and samples, as they arrive
    r = subprocess.run([*cli, "jobs", "list", "--state", "succeeded"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split()[:4] == ["ID", "NAME", "METHOD", "STATE"] and "cli-ident@1" in r.stdout
    job_id = next(line.split()[0] for line in r.stdout.splitlines() if "cli-ident@1" in line)
    r = subprocess.run([*cli, "jobs", "show", job_id], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.search(r"^    epochs +2$", r.stdout, re.M) and re.search(r"^  \* base_protection +(replay|kl|replay\+kl)$", r.stdout, re.M)
    assert re.search(r"^  \* learning_rate +[0-9.e-]+$", r.stdout, re.M) and any(line.startswith("quality: train loss") for line in lines)
    assert "      expected: " + ANSWER in lines and sum(line.startswith("  [control]") for line in lines) == 12
    r = subprocess.run([*cli, "train", "bad", "--examples", str(data), "--set", "lora_r=999"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr


def test_a_killed_worker_resumes_from_its_checkpoint(tiny_checkpoints, tmp_path):
    """Server and workers as separate processes on the same stores; SIGKILL mid-job."""
    data = tmp_path / "data"
    common = ["--model", str(tiny_checkpoints["llama"]), "--data-dir", str(data), "--device", "cpu", "--dtype", "float32",
              "--tuner-stale-seconds", "3"]

    def worker() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "hotswap.tuner.worker", *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    hp = dict(epochs=30, batch_size=2, learning_rate=1e-2, lora_r=8, seed=7)
    with ServerProcess(tiny_checkpoints["llama"], data, "--tuner-stale-seconds", "3") as srv, Client(srv.target) as c:
        first = worker()
        try:
            job = c.train_adapter("resumed", "lora", examples=EXAMPLES, **hp)
            for ev in c.watch_training_job(job.id, timeout=300):
                if ev.kind == "checkpoint" and ev.job.step < ev.job.total_steps - 10:
                    killed_after = ev.job.step
                    first.send_signal(signal.SIGKILL)
                    break
            first.wait(30)
            second = worker()
            try:
                events = finished(c, job.id)
                done = events[-1].job
                assert done.state == "succeeded" and done.adapter_id == "resumed@1", done.error_message
                assert any(e.kind == "warning" and "resuming from checkpoint" in e.message for e in events)
                assert [e.state for e in events if e.kind == "state"][-3:] == ["validating", "running", "succeeded"]
                steps = [e.metrics["step"] for e in events if e.kind == "step"]
                assert killed_after in steps and steps[-1] == done.total_steps
                straight = finished(c, c.train_adapter("straight", "lora", examples=EXAMPLES, **hp).id)[-1].job
                assert straight.state == "succeeded"
            finally:
                second.kill()
        finally:
            first.kill()
    a = load_file(data / "adapters" / "resumed" / "1" / "adapter_model.safetensors")
    b = load_file(data / "adapters" / "straight" / "1" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # same seed, same data order: the resumed run lands where the straight one does
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k


def test_every_method_trains_from_an_uploaded_file_and_serves(server, tmp_path):
    import pandas as pd

    rows = [{"prompt": f"question {q}\n", "completion": ANSWER} for q in QUESTIONS]
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    with Client(server.target) as c:
        uri = c.upload_dataset(str(parquet), chunk_bytes=512)  # several chunks
        assert uri.endswith("-rows.parquet")
        jobs = {m: c.train_adapter(f"m-{m}", m, dataset_uri=uri, epochs=1, **extra) for m, extra in [
            ("qlora", {"lora_r": 4}), ("p_tuning", {"num_virtual_tokens": 4}),
            ("prompt_tuning", {"num_virtual_tokens": 4, "prompt_tuning_init_text": "the quick brown fox"})]}
        for method, job in jobs.items():
            done = finished(c, job.id)[-1].job
            assert done.state == "succeeded", (method, done.error_message)
            g = c.generate("question who\n", adapter=done.adapter_id, max_new_tokens=3, ignore_eos=True)
            assert g.generated_tokens == 3 and g.adapter_id == f"m-{method}@1"
        assert c.get_adapter("m-qlora").labels["quantization"] == "nf4"
        assert c.get_adapter("m-p_tuning").peft_type == "P_TUNING" and c.get_adapter("m-prompt_tuning").num_virtual_tokens == 4
        with grpc.insecure_channel(server.target) as ch:
            stub = tuner_pb2_grpc.TunerServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.UploadDataset(iter([tuner_pb2.UploadDatasetRequest(filename="x.exe", chunk=b"MZ")]), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "filename" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:  # was INTERNAL, with the server's path in the message
                stub.UploadDataset(iter([tuner_pb2.UploadDatasetRequest(filename="d" * 300 + ".jsonl", chunk=b"{}")]), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "filename" in e.value.details()
            assert str(server.data_dir) not in e.value.details()
            with pytest.raises(grpc.RpcError) as e:  # an enum value this server does not know
                stub.TrainAdapter(tuner_pb2.TrainAdapterRequest(adapter_name="x", method=99), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "enum value 99" in e.value.details()


def test_early_stopping_registers_the_best_checkpoint_by_eval_loss(tiny_checkpoints, tmp_path):
    """In process, on the worker's own code path: a learning rate far too high makes eval
    loss rise after the first evaluation; patience 1 stops the job, and the adapter
    registered is the checkpoint with the lowest eval loss, not the last one."""
    from hotswap.server.adapters.registry import AdapterRegistry
    from hotswap.server.config import ModelConfig
    from hotswap.tuner.jobs import JobStore
    from hotswap.tuner.spec import TrainSpec
    from hotswap.tuner.train import run_job

    store, reg = JobStore(tmp_path / "jobs.sqlite"), AdapterRegistry(tmp_path / "reg.sqlite", tmp_path / "store")
    spec = TrainSpec.from_dict({"adapter_name": "early", "method": "lora", "train": {"inline": EXAMPLES}, "validation": {"inline": EXAMPLES[:2]},
                                "hyperparameters": {"epochs": 50, "batch_size": 2, "learning_rate": 3.0, "lora_r": 8, "warmup_ratio": 0.0,
                                                    "target_modules": ["all-linear"], "early_stopping_patience": 1}})
    store.create("early", "lora", spec.to_dict())
    job = store.claim("w")
    run_job(job, store, "w", reg, ModelConfig(source=str(tiny_checkpoints["llama"]), dtype="float32", device="cpu"), 64, tmp_path / "jobs",
            keep_checkpoints=True)
    done = store.get(job.id)
    assert done.state == "succeeded", done.error_message
    evals = [(e.payload["step"], e.payload["eval_loss"]) for e in store.events(job.id) if e.kind == "eval"]
    steps = [e.payload["step"] for e in store.events(job.id) if e.kind == "step"]
    assert steps[-1] < done.total_steps  # stopped early
    best_step = min(evals, key=lambda x: x[1])[0]
    assert best_step != evals[-1][0]
    best = load_file(tmp_path / "jobs" / job.id / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    registered = load_file(reg.path(done.adapter_id) / "adapter_model.safetensors")
    assert best.keys() == registered.keys() and all(torch.equal(best[k], registered[k]) for k in best)


def test_a_stopping_worker_hands_its_job_back_at_a_fresh_checkpoint(tiny_checkpoints, tmp_path):
    """SIGTERM (a rollout, a scale-down): the worker checkpoints at the end of its step,
    requeues the job and exits 0; the next worker resumes from exactly that step."""
    data = tmp_path / "data"
    common = ["--model", str(tiny_checkpoints["llama"]), "--data-dir", str(data), "--device", "cpu", "--dtype", "float32"]

    def worker() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "hotswap.tuner.worker", *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    with ServerProcess(tiny_checkpoints["llama"], data) as srv, Client(srv.target) as c:
        first = worker()
        try:
            job = c.train_adapter("handed-back", "lora", examples=EXAMPLES, epochs=500, batch_size=2)
            for ev in c.watch_training_job(job.id, timeout=300):
                if ev.kind == "step" and ev.metrics["step"] >= 3:
                    first.send_signal(signal.SIGTERM)
                    break
            assert first.wait(60) == 0
        finally:
            first.kill()
        back = c.get_training_job(job.id)
        assert back.state == "queued" and back.step >= 3
        second = worker()
        try:
            for ev in c.watch_training_job(job.id, timeout=300):
                if ev.kind == "warning" and ev.message.startswith("resuming from"):
                    resumed = ev.message
                if ev.kind == "step" and ev.metrics["step"] > back.step:
                    break
            c.cancel_training_job(job.id)
            events = list(c.watch_training_job(job.id, timeout=120))
        finally:
            second.kill()
    warnings = [e.message for e in events if e.kind == "warning"]
    assert f"the worker stopped; resumes from checkpoint-{back.step}" in warnings
    assert resumed == f"resuming from checkpoint-{back.step}"
    assert events[-1].job.state == "cancelled"


# -- classifiers --------------------------------------------------------------------------
KEYWORDS = {"A": "fox", "B": "dog", "C": "café", "D": "world"}
CLASSIFY = [{"text": f"{w} {t}", "label": lab} for lab, w in KEYWORDS.items() for t in ("one", "two", "three", "four", "five", "six")]
# ^ the label is the keyword's: a 4-way multiple choice the tiny random model can learn in a few epochs


def test_a_classifier_trains_reports_its_metrics_loads_in_peft_and_serves_through_classify(server, tiny_checkpoints):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    hp = dict(epochs=8, batch_size=4, learning_rate=1e-2, lora_r=8, target_modules=["all-linear"], class_weights=[1, 1, 1, 2])
    with Client(server.target) as c:
        job = c.train_adapter("cls", "classification", examples=CLASSIFY, validation_examples=CLASSIFY[::3], **hp)
        events = finished(c, job.id)
        done = events[-1].job
        assert done.state == "succeeded", done.error_message
        evals = [e.metrics for e in events if e.kind == "eval"]
        assert len(evals) >= 3 and all({"accuracy", "precision", "recall", "f1", "eval_loss"} <= set(m) for m in evals)
        assert [m["epoch"] for m in evals] == [float(i) for i in range(1, len(evals) + 1)]  # once per epoch
        plan = done.plan.hyperparameters
        assert plan["label_names"] == ["A", "B", "C", "D"] and plan["class_weights"] == [1, 1, 1, 2] and plan["best_metric"] == "f1"
        assert {"label_names", "best_metric", "classifier_adapter"} <= set(done.plan.automatic) and not plan["base_protection"]
        report = done.quality.classification
        assert report.split == "validation" and report.label_names == ["A", "B", "C", "D"]
        assert report.f1 == pytest.approx(max(m["f1"] for m in evals)) and report.accuracy >= 0.75  # the best epoch's checkpoint
        assert sum(map(sum, report.confusion)) == 8 and [x.support for x in report.per_label] == [2, 2, 2, 2]
        meta = c.get_adapter("cls")
        assert meta.labels["method"] == "classification" and meta.labels["task"] == "SEQ_CLS" and meta.labels["num_labels"] == "4"
    r = subprocess.run([sys.executable, "-m", "hotswap.client.cli", "--target", server.target, "jobs", "show", job.id],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^classification \(validation\): accuracy [01]\.\d+, macro precision .* f1 ", r.stdout, re.M)
    assert re.search(r"^  \* label_names +A,B,C,D$", r.stdout, re.M) and "confusion (rows true" in r.stdout
    path = server.data_dir / "adapters" / "cls" / "1"
    assert json.loads((path / "config.json").read_text())["id2label"] == {"0": "A", "1": "B", "2": "C", "3": "D"}
    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["llama"])

    def accuracy(model) -> float:
        with torch.inference_mode():
            right = [model(input_ids=torch.tensor([tok(e["text"])["input_ids"]])).logits.argmax(-1).item() == "ABCD".index(e["label"])
                     for e in CLASSIFY]
        return sum(right) / len(right)

    def base():  # the base with the head config.json describes (its labels, its pad token)
        config = AutoConfig.from_pretrained(path)
        return AutoModelForSequenceClassification.from_pretrained(tiny_checkpoints["llama"], config=config, dtype=torch.float32)

    # the registered files load in plain PEFT
    untrained = accuracy(base().eval())
    peft = PeftModel.from_pretrained(base(), path).eval()
    trained = accuracy(peft)
    assert trained >= 0.75 and trained >= untrained + 0.25, (trained, untrained)

    # and Classify serves the new adapter at once, with its labels, agreeing with PEFT (the server runs
    # the tiny model in its automatic dtype, so logits agree to bf16 precision, not bit for bit)
    with Client(server.target) as c:
        served = [c.classify(e["text"], adapter="cls") for e in CLASSIFY]
    assert all(r.labels == ["A", "B", "C", "D"] and r.adapter_id == "cls@1" for r in served)
    with torch.inference_mode():
        want = [peft(input_ids=torch.tensor([tok(e["text"])["input_ids"]])).logits[0] for e in CLASSIFY]
    for r, w in zip(served, want):
        top2 = w.topk(2).values
        if top2[0] - top2[1] > 0.25:  # a clear answer: bf16 rounding cannot flip it
            assert r.label == "ABCD"[int(w.argmax())], (r.logits, w.tolist())
        assert torch.allclose(torch.tensor(r.logits), w, atol=0.25 + 0.05 * float(w.abs().max())), (r.logits, w.tolist())


def test_soft_prompt_classifiers_train_and_bad_classifier_requests_name_the_field(server, tmp_path):
    with Client(server.target) as c:
        jobs = {a: c.train_adapter(f"cls-{a}", "classification", examples=CLASSIFY, classifier_adapter=a, epochs=1, batch_size=8,
                                   num_virtual_tokens=4, best_metric="accuracy") for a in ("prompt_tuning", "prefix_tuning")}
        # refused at submit: what the request alone shows
        for kw, needle in [(dict(label_names=["A", "A"]), "hyperparameters.label_names.*twice"),
                           (dict(label_names=["only"]), "hyperparameters.label_names.*at least 2"),
                           (dict(class_weights=[1.0, -1.0, 1.0, 1.0]), "hyperparameters.class_weights.*finite"),
                           (dict(class_weights=[1.0, float("nan"), 1.0, 1.0]), "hyperparameters.class_weights.*finite"),
                           (dict(class_weights=[1.0, 1.0]), "hyperparameters.class_weights.*2 weights for 4"),
                           (dict(best_metric="auc"), "hyperparameters.best_metric"),
                           (dict(classifier_adapter="ia3"), "hyperparameters.classifier_adapter"),
                           (dict(label_names=["A", "B"]), "example 13 has label 'C'")]:
            with pytest.raises(InvalidArgument, match=needle):
                c.train_adapter("x", "classification", examples=CLASSIFY, **kw)
        with pytest.raises(InvalidArgument, match="example 2 has no label"):
            c.train_adapter("x", "classification", examples=[CLASSIFY[0], {"text": "no label"}])
        with pytest.raises(InvalidArgument, match="train.*at least 2 labels"):
            c.train_adapter("x", "classification", examples=CLASSIFY[:6])
        with pytest.raises(FailedPrecondition, match="absent from the base model: qkv"):
            c.train_adapter("x", "classification", examples=CLASSIFY, target_modules=["qkv"])
        # only the worker sees a file's labels: the job fails with the field and the line
        unlabelled, unknown, weights = tmp_path / "u.jsonl", tmp_path / "k.jsonl", tmp_path / "w.jsonl"
        unlabelled.write_text("".join(json.dumps(e) + "\n" for e in CLASSIFY[:3] + [{"text": "x"}]))
        unknown.write_text("".join(json.dumps(e) + "\n" for e in CLASSIFY))
        weights.write_text("".join(json.dumps(e) + "\n" for e in CLASSIFY))
        for job, needle in [(c.train_adapter("x", "classification", dataset_uri=c.upload_dataset(str(unlabelled))), "example 4 has no label"),
                            (c.train_adapter("x", "classification", dataset_uri=c.upload_dataset(str(unknown)), label_names=["A", "B", "C"]),
                             "example 19 has label 'D'"),
                            (c.train_adapter("x", "classification", dataset_uri=c.upload_dataset(str(weights)), class_weights=[1, 2]),
                             "2 weights for 4")]:
            last = finished(c, job.id)[-1].job
            assert last.state == "failed" and last.error_code == "INVALID_ARGUMENT" and needle in last.error_message, last.error_message
        for adapter, job in jobs.items():
            done = finished(c, job.id)[-1].job
            assert done.state == "succeeded", (adapter, done.error_message)
            assert done.plan.hyperparameters["classifier_adapter"] == adapter and done.quality.classification.split == "train"
        assert c.get_adapter("cls-prompt_tuning").peft_type == "PROMPT_TUNING" and c.get_adapter("cls-prefix_tuning").num_virtual_tokens == 4
        assert not c.list_adapters(name="x")
