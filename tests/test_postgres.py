"""The registry and the job store on a real PostgreSQL server (the multi-node setting):
the same behaviour as SQLite, concurrent worker processes never run a job twice, and a
server + tuner pointed at PostgreSQL serve and train end to end."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hotswap.client import Client
from hotswap.server.adapters.load import load_adapter
from hotswap.server.adapters.registry import AdapterRegistry
from hotswap.server.errors import NotFound
from hotswap.tuner.jobs import JobStore
from peft_fixtures import save_adapter
from postgres_server import PostgresServer
from server_process import ServerProcess


@pytest.fixture(scope="module")
def postgres():
    # Not under pytest's tmp dir: that is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="hotswap-pg-"))
    pg = PostgresServer(root).start()
    yield pg
    pg.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def lora(tiny_checkpoints, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    return save_adapter(model, "lora", tmp_path_factory.mktemp("pg-adapters") / "lora")


def test_registry_versions_and_concurrent_registrations(postgres, lora, tiny_checkpoints, tmp_path):
    url = postgres.new_database()
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    validate = lambda p: load_adapter(p, p.name, base, 64)  # noqa: E731
    errors = []

    def register():
        try:  # separate registry objects (connections), as separate nodes would have
            AdapterRegistry(url, tmp_path / "store").register("shared", str(lora), validate, "fp")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=register) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    reg = AdapterRegistry(url, tmp_path / "store")
    assert reg.ids() == [f"shared@{v}" for v in range(1, 5)] and reg.get("shared").id == "shared@4"
    rec = reg.get("shared@2")
    assert rec.peft_type == "LORA" and rec.created_at > 1.7e9 and (rec.path / "adapter_model.safetensors").is_file()
    assert [r.id for r in reg.delete("shared@4")] == ["shared@4"]
    assert reg.register("shared", str(lora), validate, "fp").id == "shared@5"  # never reused
    page, token = reg.list(page_size=2)
    assert [r.id for r in page] == ["shared@1", "shared@2"] and token
    with pytest.raises(NotFound):
        reg.get("nothing")


WORKER = """
import json, sys
from hotswap.tuner.jobs import JobStore
store, me, got = JobStore(sys.argv[1]), sys.argv[2], []
while (job := store.claim(me)) is not None:
    got.append(job.id)
    store.set_state(job.id, me, "succeeded")
print(json.dumps(got))
"""


def test_concurrent_worker_processes_never_run_a_job_twice(postgres):
    url = postgres.new_database()
    store = JobStore(url)
    ids = {store.create(f"a{i}", "lora", {"i": i}).id for i in range(40)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, f"w{i}"], stdout=subprocess.PIPE, text=True) for i in range(4)]
    claimed = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    every = [j for c in claimed for j in c]
    assert sorted(every) == sorted(ids) and len(every) == len(set(every))
    assert store.counts_by_state()["succeeded"] == 40
    events = store.events(next(iter(ids)))
    assert [e.payload["state"] for e in events] == ["queued", "validating", "succeeded"] and [e.seq for e in events] == [0, 1, 2]


def test_server_and_tuner_on_postgres(postgres, lora, tiny_checkpoints, tmp_path):
    import psycopg

    registry_url, jobs_url = postgres.new_database(), postgres.new_database()
    stores = ["--registry-db", registry_url, "--jobs-db", jobs_url]
    with ServerProcess(tiny_checkpoints["llama"], tmp_path / "data", *stores, "--tuner-workers", "1") as srv, Client(srv.target) as c:
        assert c.register_adapter("pg-lora", str(lora)).id == "pg-lora@1"
        assert c.generate("hello", adapter="pg-lora", max_new_tokens=3, ignore_eos=True).generated_tokens == 3
        job = c.train_adapter("pg-trained", "prompt_tuning", examples=[{"text": "the quick brown fox"}] * 4, epochs=1, num_virtual_tokens=4)
        done = list(c.watch_training_job(job.id, timeout=300))[-1].job
        assert done.state == "succeeded" and done.adapter_id == "pg-trained@1", done.error_message
        assert c.generate("hello", adapter="pg-trained", max_new_tokens=2, ignore_eos=True).adapter_id == "pg-trained@1"
        assert {a.id for a in c.list_adapters()} == {"pg-lora@1", "pg-trained@1"}
    # the rows really live in PostgreSQL, and nothing fell back to a SQLite file
    with psycopg.connect(registry_url) as db:
        assert sorted(r[0] for r in db.execute("SELECT name FROM adapters")) == ["pg-lora", "pg-trained"]
    with psycopg.connect(jobs_url) as db:
        assert db.execute("SELECT state FROM jobs").fetchall() == [("succeeded",)]
    assert not list((tmp_path / "data").glob("*.sqlite"))
