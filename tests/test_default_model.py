"""Realism: the built-in default model (SmolLM2-135M-Instruct) serving a mixed batch
of chat requests matches PEFT / transformers running each request alone (fp32, greedy)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from peft_fixtures import save_adapter
from test_engine_fidelity import reference

pytestmark = pytest.mark.slow
NEW = 16
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?"]


def test_default_model_mixed_batch_matches_peft(default_model_cache, tmp_path):
    cache, _, _ = default_model_cache
    loaded = load_base_model(ModelConfig(source="default", dtype="float32", device="cpu", cache_dir=cache))
    ckpt = loaded.checkpoint_dir
    fp32 = lambda: AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)  # noqa: E731
    paths = {
        "lora": save_adapter(fp32(), "rslora", tmp_path / "lora", seed=1, scale=0.05),
        "prefix": save_adapter(fp32(), "prefix", tmp_path / "prefix", seed=2, scale=0.05),
        "prompt": save_adapter(fp32(), "prompt_text", tmp_path / "prompt", seed=3, scale=0.05, tokenizer=str(ckpt)),
    }
    tok = loaded.tokenizer
    jobs = [(a, tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False))
            for q in QUESTIONS for a in ("", "lora", "prefix", "prompt")][:8]
    with ServingCore(loaded, EngineConfig(max_batch_size=8, max_seq_len=256)) as core:
        for name, path in paths.items():
            core.register_adapter(name, path)
        params = SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=0)
        results = [s.result(300) for s in [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=params)) for a, p in jobs]]
    base_texts = set()
    for (a, p), r in zip(jobs, results):
        tokens, lp = reference(ckpt, paths.get(a), p, new=NEW)
        assert r.error is None and r.token_ids == tokens, (a or "base", tok.decode(r.token_ids), tok.decode(tokens))
        ours = torch.tensor([x.logprob for x in r.logprobs])
        torch.testing.assert_close(ours, lp[torch.arange(NEW), torch.tensor(tokens)], atol=1e-3, rtol=1e-3)
        if not a:
            base_texts.add(r.text)
    assert any("Paris" in t for t in base_texts)


@pytest.mark.slow
def test_the_demo_serves_a_mixed_batch(default_model_cache, capsys):
    from hotswap.server.demo import main

    main(["--cache-dir", str(default_model_cache[0]), "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    for name in ("pirate-prompt@1", "french-prefix@1", "noisy-lora@1"):
        assert f"registered {name}" in out
    assert "8 requests, 8 in one continuous batch" in out and out.count(" tokens, ") == 8
