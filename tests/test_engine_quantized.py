"""bitsandbytes NF4 and int8 bases (the same code path as on a GPU, run on CPU here):
the engine's mixed batch matches PEFT running each adapter alone on the same quantized base."""
from __future__ import annotations

import pytest
import torch
from peft.utils.integrations import dequantize_module_weight
from transformers import AutoModelForCausalLM

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine.lora_fold import dense_weight
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from peft_fixtures import save_adapter
from test_engine_fidelity import reference

NEW = 8
JOBS = [("lora", [5, 17, 33, 41]), ("prefix", [7, 8, 9, 10, 11]), ("prompt_text", [100, 200]), ("", [300, 301, 302]),
        ("ia3", [77, 78, 79, 80]), ("dora", [12, 90, 14])]  # DoRA's norm over the dequantized weight; IA3 around a quantized linear
# PEFT's own DoRA forward on an int8 CPU base fails (its dequantize_module_weight re-assigns the
# weight, dropping its scales), so there is no reference for DoRA on int8.
NO_REFERENCE = {"int8": {"dora"}}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_mixed_batch_matches_peft(tiny_checkpoints, tmp_path, quantization):
    jobs = [(a, p) for a, p in JOBS if a not in NO_REFERENCE.get(quantization, ())]
    ckpt = tiny_checkpoints["llama"]
    cfg = ModelConfig(source=str(ckpt), quantization=quantization, dtype="float32", device="cpu")
    paths = {k: save_adapter(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), k, tmp_path / k, seed=i)
             for i, k in enumerate(a for a, _ in jobs if a)}
    with ServingCore(load_base_model(cfg), EngineConfig(max_batch_size=8, max_seq_len=64)) as core:
        for k, p in paths.items():
            core.register_adapter(k, p)
        streams = [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a,
                                               params=SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=0)))
                   for a, p in jobs]
        results = [s.result(120) for s in streams]
    for (a, p), r in zip(jobs, results):
        tokens, lp = reference(ckpt, paths.get(a), p, new=NEW, model=load_base_model(cfg).model)
        assert r.error is None and r.token_ids == tokens, a or "base"
        ours = torch.tensor([x.logprob for x in r.logprobs])
        torch.testing.assert_close(ours, lp[torch.arange(NEW), torch.tensor(tokens)], atol=2e-3, rtol=1e-3)
    # DoRA's norm reads the dequantized weight: ours equals PEFT's (taken on a layer that never ran, where PEFT's is sound)
    linear = load_base_model(cfg).model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(dense_weight(linear).float(), dequantize_module_weight(linear).float())
