"""Base model sources and quantization, through the real loader."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from transformers import AutoModelForCausalLM

from hotswap.server.config import ModelConfig
from hotswap.server.errors import InvalidArgument, ModelLoadError
from hotswap.server.model import gguf_convert
from hotswap.server.model.loader import load_base_model
from hotswap.server.model.sources import default_gguf


def test_local_folder_matches_plain_transformers(tiny_checkpoints):
    ckpt = tiny_checkpoints["llama"]
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x).logits, plain(x).logits)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert loaded.tokenizer.chat_template and loaded.tokenizer.pad_token_id is not None
    again = load_base_model(ModelConfig(source=str(ckpt), dtype="bfloat16", device="cpu"))
    assert again.fingerprint == loaded.fingerprint and again.model.dtype == torch.bfloat16


@pytest.mark.parametrize("quantization,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_bitsandbytes_quantization_runs_on_cpu(tiny_checkpoints, quantization, layer):
    loaded = load_base_model(ModelConfig(source=str(tiny_checkpoints["llama"]), quantization=quantization, dtype="float32", device="cpu"))
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()


def test_hub_id_is_served_from_the_local_cache_only(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    # The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}.
    repo = tmp_path / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_checkpoints["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_base_model(ModelConfig(source="tiny-org/tiny-llama", dtype="float32", device="cpu"))
    assert loaded.checkpoint_dir == repo / "snapshots" / commit
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as e:
        load_base_model(ModelConfig(source="tiny-org/absent-model"))
    assert time.monotonic() - start < 10 and e.value.field == "source"


def test_bad_sources_and_options_name_the_field(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a folder"):
        load_base_model(ModelConfig(source=str(tmp_path / "nowhere")))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_base_model(ModelConfig(source=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(ModelConfig(source=str(tmp_path / "x.gguf")))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="could not read GGUF"):
        load_base_model(ModelConfig(source=str(tmp_path / "junk.gguf"), cache_dir=tmp_path / "cache"))
    assert not any((tmp_path / "cache").glob("junk*"))  # no half-written cache entry
    with pytest.raises(InvalidArgument) as e:
        ModelConfig(quantization="fp3")
    assert e.value.field == "quantization"


@pytest.mark.slow
def test_default_gguf_is_converted_once_then_reused(default_model_cache, monkeypatch):
    cache, converted_in, fingerprint = default_model_cache
    cfg = ModelConfig(source="default", dtype="float32", device="cpu", cache_dir=cache)

    def no_gguf(*a, **k):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(gguf_convert, "_chat_template_from_gguf", no_gguf)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _refuse_gguf(AutoModelForCausalLM.from_pretrained))
    start = time.monotonic()
    loaded = load_base_model(cfg)
    assert time.monotonic() - start < converted_in / 3
    assert loaded.fingerprint == fingerprint and loaded.checkpoint_dir.parent == cache
    assert loaded.tokenizer.chat_template and "<|im_start|>" in loaded.tokenizer.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = loaded.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert default_gguf().is_file()


def _refuse_gguf(original):
    def wrapped(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF was read again"
        return original(*args, **kwargs)

    return wrapped


@pytest.mark.skipif(not has_avx512bf16(),
                    reason="bitsandbytes looks for a hub kernel only on CPUs with AVX-512 BF16")
@pytest.mark.parametrize("package", ["hotswap.server", "hotswap.tuner"])
def test_importing_peft_prints_no_hint_to_fetch_kernels(package):
    """A fresh process that imports our package and then PEFT (which imports bitsandbytes) prints nothing that
    tells the user to install a package fetching code from the hub; bitsandbytes' own CPU kernel still runs."""
    done = subprocess.run([sys.executable, "-c", f"import {package}, peft"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "kernels" not in done.stderr + done.stdout
