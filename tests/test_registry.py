"""The adapter registry: a real SQLite file and a real store folder, real PEFT adapters."""
from __future__ import annotations

import sqlite3
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from hotswap.server.adapters.load import load_adapter
from hotswap.server.adapters.registry import AdapterRegistry, parse_adapter_id
from hotswap.server.errors import AdapterIncompatible, InvalidArgument, NotFound
from peft_fixtures import save_adapter


def fresh(tiny_checkpoints):
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base(tiny_checkpoints):
    return fresh(tiny_checkpoints)


@pytest.fixture(scope="module")
def saved(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry-adapters")
    return {k: save_adapter(fresh(tiny_checkpoints), k, root / k, seed=i) for i, k in enumerate(["lora", "prefix", "prompt_random"])}


def validator(base, max_rank=64):
    return lambda path: load_adapter(path, path.name, base, max_rank)


def test_versions_resolve_and_survive_reopening(base, saved, tmp_path):
    reg = AdapterRegistry(tmp_path / "r.sqlite", tmp_path / "store")
    a1 = reg.register("bot", str(saved["lora"]), validator(base), "fp-1", {"team": "a"})
    a2 = reg.register("bot", str(saved["prefix"]), validator(base), "fp-1")
    assert (a1.id, a2.id) == ("bot@1", "bot@2")
    assert a1.peft_type == "LORA" and a1.rank == 4 and "q_proj" in a1.target_modules and a1.labels == {"team": "a"}
    assert a2.peft_type == "PREFIX_TUNING" and a2.num_virtual_tokens > 0 and a2.rank == 0
    assert a1.path.is_relative_to(tmp_path / "store") and (a1.path / "adapter_model.safetensors").is_file()

    again = AdapterRegistry(tmp_path / "r.sqlite", tmp_path / "store")  # a restart
    assert again.get("bot").id == "bot@2"  # bare name = latest
    assert again.get("bot@1").peft_type == "LORA"
    assert again.ids() == ["bot@1", "bot@2"]


def test_deleted_versions_are_never_reused(base, saved, tmp_path):
    reg = AdapterRegistry(tmp_path / "r.sqlite", tmp_path / "store")
    reg.register("x", str(saved["lora"]), validator(base), "fp")
    reg.register("x", str(saved["lora"]), validator(base), "fp")
    gone = reg.delete("x@2")
    assert [r.id for r in gone] == ["x@2"] and not gone[0].path.exists()
    assert reg.get("x").id == "x@1"
    assert reg.register("x", str(saved["lora"]), validator(base), "fp").id == "x@3"
    assert sorted(r.id for r in reg.delete("x")) == ["x@1", "x@3"]
    with pytest.raises(NotFound):
        reg.get("x")
    with pytest.raises(NotFound):
        reg.delete("x")


def test_a_failed_registration_leaves_nothing_behind(base, saved, tmp_path):
    reg = AdapterRegistry(tmp_path / "r.sqlite", tmp_path / "store")
    reg.register("ok", str(saved["lora"]), validator(base), "fp")
    with pytest.raises(AdapterIncompatible) as e:
        reg.register("ok", str(saved["lora"]), validator(base, max_rank=2), "fp")  # rank 4 > 2
    assert e.value.field == "r" and "maximum 2" in str(e.value)
    assert reg.ids() == ["ok@1"] and reg.get("ok").id == "ok@1"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [".staging", "ok"]
    assert not any((tmp_path / "store" / ".staging").iterdir())
    assert [p.name for p in (tmp_path / "store" / "ok").iterdir()] == ["1"]


def test_bad_sources_and_names_are_refused_with_the_field(base, saved, tmp_path):
    reg = AdapterRegistry(tmp_path / "r.sqlite", tmp_path / "store")
    for bad in ["../etc", "a/b", "/abs", "", "x" * 200, "..", "name@1", ".hidden"]:
        with pytest.raises(InvalidArgument) as e:
            reg.register(bad, str(saved["lora"]), validator(base), "fp")
        assert e.value.field == "name"
    for bad in ["../etc", "a/b@1", "x@", "x@v1", ""]:
        with pytest.raises(InvalidArgument) as e:
            parse_adapter_id(bad)
        assert e.value.field == "adapter_id"
    with pytest.raises(NotFound) as e:
        reg.register("n", str(tmp_path / "missing"), validator(base), "fp")
    assert e.value.field == "source_uri"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((saved["lora"] / "adapter_config.json").read_bytes())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(InvalidArgument, match="pickle") as e:
        reg.register("n", str(pickled), validator(base), "fp")
    assert e.value.field == "source_uri"
    with pytest.raises(InvalidArgument, match="page_token"):
        reg.list(page_token="garbage")


def test_file_urls_and_paging(base, saved, tmp_path):
    reg = AdapterRegistry(tmp_path / "r.sqlite", tmp_path / "store")
    for i in range(5):
        reg.register(f"a{i}", saved["prompt_random"].as_uri(), validator(base), "fp")  # file:// URL through fsspec
    reg.register("a0", str(saved["prompt_random"]), validator(base), "fp")
    seen, token, pages = [], "", 0
    while True:
        page, token = reg.list(page_size=2, page_token=token)
        seen += [r.id for r in page]
        pages += 1
        if not token:
            break
    assert seen == ["a0@1", "a0@2", "a1@1", "a2@1", "a3@1", "a4@1"] and pages == 3
    assert [r.id for r in reg.list(name="a0")[0]] == ["a0@1", "a0@2"]


def test_concurrent_registrations_get_distinct_versions(base, saved, tmp_path):
    errors = []

    def register():
        try:  # each thread its own registry object: as separate processes would
            AdapterRegistry(tmp_path / "r.sqlite", tmp_path / "store").register("busy", str(saved["lora"]), validator(base), "fp")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=register) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    reg = AdapterRegistry(tmp_path / "r.sqlite", tmp_path / "store")
    assert reg.ids() == [f"busy@{v}" for v in range(1, 5)]
    assert all((reg.path(i) / "adapter_model.safetensors").is_file() for i in reg.ids())


def test_a_hand_edited_row_cannot_point_outside_the_store(base, saved, tmp_path):
    reg = AdapterRegistry(tmp_path / "r.sqlite", tmp_path / "store")
    reg.register("fine", str(saved["lora"]), validator(base), "fp")
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        db.execute("UPDATE adapters SET name = '../../etc' WHERE name = 'fine'")
    with pytest.raises(InvalidArgument, match="outside the store"):
        reg.list()


def test_a_database_url_is_never_mistaken_for_a_file(tmp_path):
    for bad in ("postgresql:/user@host/db", "mysql://user@host/db"):  # e.g. a URL squashed by Path()
        with pytest.raises(InvalidArgument, match="postgresql://"):
            AdapterRegistry(bad, tmp_path / "store")
    assert not any(p.name.startswith(("postgresql", "mysql")) for p in tmp_path.rglob("*"))


def test_staging_of_dead_registrations_is_removed_at_start_and_deletes_leave_no_folders(base, saved, tmp_path):
    """A registration SIGKILLed mid-copy left its staging folder forever (1.7 GiB after four kills)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    staging = tmp_path / "store" / ".staging"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    host = socket.gethostname()
    folders = {
        "dead": staging / f"{host}-{dead.stdout.strip()}-abc",  # this host, its process gone
        "live": staging / f"{host}-{os.getpid()}-def",  # a registration still running
        "other-host": staging / "elsewhere-1-0123",  # another node of a shared store, recent
        "old": staging / "elsewhere-2-4567",  # another node, days old
    }
    for d in folders.values():
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    two_days_ago = time.time() - 2 * 86400
    os.utime(folders["old"], (two_days_ago, two_days_ago))
    reg = AdapterRegistry(tmp_path / "r.sqlite", tmp_path / "store")
    assert {k for k, d in folders.items() if d.exists()} == {"live", "other-host"}

    reg.register("gone", str(saved["lora"]), validator(base), "fp-1")
    reg.delete("gone")
    assert not (tmp_path / "store" / "gone").exists()
