"""Two nodes sharing stores: the registry in one database, adapter files on object storage
(a local S3) with a node-local cache each. An adapter registered on one node serves on
the other; a delete on either is seen by both."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hotswap.client import Client, NotFound
from peft_fixtures import save_adapter
from s3_server import MotoS3
from server_process import ServerProcess
from test_engine_fidelity import reference


@pytest.fixture(scope="module")
def s3():
    moto = MotoS3().start()
    moto.client().create_bucket(Bucket="store")
    yield moto
    moto.stop()


def test_two_nodes_share_an_s3_adapter_store(s3, tiny_checkpoints, tmp_path):
    lora = save_adapter(AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32), "lora_mlp", tmp_path / "lora")
    shared = ["--registry-db", str(tmp_path / "registry.sqlite"), "--adapter-store", "s3://store/adapters"]
    a = ServerProcess(tiny_checkpoints["llama"], tmp_path / "node-a", *shared, env=s3.env).start()
    b = ServerProcess(tiny_checkpoints["llama"], tmp_path / "node-b", *shared, env=s3.env).start()
    try:
        with Client(a.target) as ca, Client(b.target) as cb:
            assert ca.register_adapter("team", str(lora)).id == "team@1"
            keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket="store")["Contents"])
            assert keys == ["adapters/team/1/adapter_config.json", "adapters/team/1/adapter_model.safetensors"]
            cache_b = tmp_path / "node-b" / "adapter-cache" / "team" / "1"
            assert not cache_b.exists()
            ids = cb.tokenize("hello world").token_ids
            got = cb.generate("hello world", adapter="team", max_new_tokens=6, ignore_eos=True)
            assert got.adapter_id == "team@1" and (cache_b / "adapter_model.safetensors").is_file()  # fetched once, locally
            assert got.token_ids == reference(tiny_checkpoints["llama"], lora, ids, 6)[0]
            assert cb.delete_adapter("team") == ["team@1"]
            assert "Contents" not in s3.client().list_objects_v2(Bucket="store")
            with pytest.raises(NotFound):
                ca.get_adapter("team")
    finally:
        a.stop()
        b.stop()
