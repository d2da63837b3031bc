"""transformers' rotary embedding in bf16 / fp16 on CPU runs through the native kernel inside
the engine's forward (engine/fused_rotary.py): only where the architecture's function was
verified to compute the same, only on the engine's thread while it runs a step, and the
results are bit for bit those of the eager function."""
from __future__ import annotations

import threading

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine import kernels, runner
from hotswap.server.engine.fused_rotary import engaged, fuse_rotary
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from conftest import VOCAB, save_tiny_checkpoint
from peft_fixtures import save_adapter
from tiny_archs import ARCHS

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not kernels.native_available(), reason="native kernels unavailable on this machine")

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB),
    "qwen3": ARCHS["qwen3"],  # q / k norms before the rotation
    "phi3": ARCHS["phi3"],  # fused qkv_proj: q and k are slices of one output
    "gpt_neox": ARCHS["gpt_neox"],  # partial rotary (a quarter of each head): the eager function runs
    "gpt_oss": ARCHS["gpt_oss"],  # a rotary function of another shape: refused at verification
    # Cohere rotates interleaved pairs under the same function name: refused at verification.
    "cohere": lambda: tf.CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB),
}
FUSED = {"llama": 1, "qwen3": 1, "phi3": 1, "gpt_neox": 1, "gpt_oss": 0, "cohere": 0}
TAKES_KERNEL = {"llama", "qwen3", "phi3"}


def tiny(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = CONFIGS[arch]()
    cfg.pad_token_id = 0  # some configs name a pad id past this vocabulary
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_rotary_takes_the_kernel_only_where_it_computes_the_same(monkeypatch, arch, dtype):
    model = tiny(arch, dtype)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert fuse_rotary(model, CPU, dtype, head_dim) == FUSED[arch]
    assert fuse_rotary(model, CPU, dtype, head_dim) == FUSED[arch]  # a second engine wraps nothing twice
    calls = []
    real = kernels.rotary
    monkeypatch.setattr(kernels, "rotary", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        own = model(ids).logits
        assert not calls  # outside an engine forward: the eager function
        with engaged():
            fused = model(ids).logits
    assert bool(calls) == (arch in TAKES_KERNEL)
    assert torch.equal(fused, own)


def test_engaged_is_per_thread_and_nests():
    model = tiny("llama", torch.bfloat16)
    fuse_rotary(model, CPU, torch.bfloat16, 16)
    from hotswap.server.engine import fused_rotary

    seen = []
    with engaged():
        with engaged():
            pass
        assert fused_rotary._local.on  # the inner block restored the outer one's state
        worker = threading.Thread(target=lambda: seen.append(getattr(fused_rotary._local, "on", False)))
        worker.start()
        worker.join()
    assert seen == [False] and not fused_rotary._local.on


def test_fp32_and_autograd_keep_the_eager_function(monkeypatch):
    calls = []
    real = kernels.rotary
    monkeypatch.setattr(kernels, "rotary", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny("llama", torch.float32)
    assert fuse_rotary(model, CPU, torch.float32, 16) == 0
    ids = torch.randint(3, VOCAB, (1, 9))
    with engaged(), torch.inference_mode():
        model(ids)
    bf16 = tiny("llama", torch.bfloat16)
    fuse_rotary(bf16, CPU, torch.bfloat16, 16)
    calls.clear()
    with engaged():  # training on the same model: autograd needs the eager ops
        bf16(ids).logits.float().sum().backward()
    assert not calls and bf16.model.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_tokens_are_identical_fused_or_not(tiny_checkpoints, tmp_path, monkeypatch, arch):
    """bf16, a mixed batch of LoRA, prefix and base rows with prompts long enough for several prefill
    chunks, the steps driven on this thread (the same batches in both runs): the same tokens and the same
    log-probs, bit for bit, with the rotary kernel or without."""
    ckpt = tiny_checkpoints[arch] if arch in tiny_checkpoints else save_tiny_checkpoint(ARCHS[arch](), tmp_path / arch)
    paths = {k: save_adapter(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), k, tmp_path / k, seed=i)
             for i, k in enumerate(["lora", "prefix"])}
    gen = torch.Generator().manual_seed(5)
    jobs = [(a, torch.randint(3, 400, (n,), generator=gen).tolist()) for a, n in [("lora", 9), ("prefix", 40), ("", 70), ("", 4)]]
    params = SamplingParams(max_new_tokens=8, logprobs=3, ignore_eos=True)
    results, counts, calls = {}, {}, []
    real = kernels.rotary
    monkeypatch.setattr(kernels, "rotary", lambda *a, **k: calls.append(1) or real(*a, **k))
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(runner, "fuse_rotary", lambda *a: 0)
        loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="bfloat16", device="cpu"))
        with ServingCore(loaded, EngineConfig(max_batch_size=8, max_seq_len=128, max_tokens_per_step=32)) as core:
            for k, p in paths.items():
                core.register_adapter(k, p)
            ids = {"": "", **{k: core.resolve(k) for k in paths}}
            for k in paths:
                core.adapters.load(ids[k])
            core.loop.shutdown()  # this thread drives the engine from here
            engine = core.engine
            counts[fused] = engine.runner.fused_rotary
            rows = [engine.make_row(GenerateRequest(prompt_ids=prompt, adapter_id=ids[a], params=params), lambda e: None)
                    for a, prompt in jobs]
            for row in rows:
                engine.add_row(row)
            got: dict[int, list] = {id(row): [] for row in rows}
            calls.clear()
            while engine.has_work:
                engine.step()
                for row, event in engine.take_events():
                    got[id(row)] += [(lp.token_id, lp.logprob, lp.top) for lp in event.logprobs]
            results[fused] = [got[id(row)] for row in rows]
            counts[fused] = (counts[fused], len(calls))
    assert counts[True][0] == 1 and counts[True][1] > 0 and counts[False] == (0, 0)
    assert [len(r) for r in results[True]] == [8] * len(jobs)
    assert results[True] == results[False]
