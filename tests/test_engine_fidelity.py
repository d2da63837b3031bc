"""The contract: a request served in a mixed batch gets the tokens (greedy, fp32)
and the log-probs (within float tolerance) that PEFT's own PeftModel gives
running that adapter alone — for every adapter type, on two architectures,
with rows of different prompt lengths arriving at different decode steps."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine import kernels
from hotswap.server.engine.request import FinishReason, GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from peft_fixtures import save_adapter

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the Triton kernels are checked: compiled on a GPU, else in Triton's interpreter (conftest)."""
KINDS = ["lora", "lora_mlp", "rslora", "adalora", "adalora_pruned", "prompt_random", "prompt_text", "ptuning", "prefix", "prefix_proj"]
NEW = 10
TOP = 5


def reference(checkpoint, adapter_path, prompt_ids: list[int], new: int = NEW, model=None):
    """PEFT running the adapter alone (plain transformers for the base), greedy, one full
    forward per token (no KV cache, EOS not special): tokens and log-probs (new, vocab).
    `model`: a base model to use instead of loading `checkpoint` in fp32 (e.g. quantized)."""
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path).eval()
    ids, logprobs = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(new):
            x = torch.tensor([ids])
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].float()
            logprobs.append(torch.log_softmax(logits, -1))
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):], torch.stack(logprobs)


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 400, (int(torch.randint(2, 14, (1,), generator=gen)),), generator=gen).tolist() for _ in range(n)]


def run_in_waves(core: ServingCore, jobs, params, waves=3):
    """Submit in waves, each after the previous wave's rows are decoding."""
    streams = []
    size = -(-len(jobs) // waves)
    for w in range(0, len(jobs), size):
        streams += [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=params)) for a, p in jobs[w: w + size]]
        next(iter(streams[-1]))  # its first token exists: the batch is mid-decode when the next wave lands
    return [s.result(timeout=120) for s in streams]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def adapters(request, tiny_checkpoints, tmp_path_factory):
    arch = request.param
    ckpt = tiny_checkpoints[arch]
    root = tmp_path_factory.mktemp(f"adapters-{arch}")
    paths = {}
    for i, kind in enumerate(KINDS):
        base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        paths[kind] = save_adapter(base, kind, root / kind, seed=i)
    jobs = list(zip(KINDS + ["", ""], prompts(len(KINDS) + 2)))
    refs = [reference(ckpt, paths.get(a), p) for a, p in jobs]
    for (a, p), (_, lp) in zip(jobs, refs):
        if a:  # the adapter really changes the model, so matching PEFT means applying it
            assert (lp - reference(ckpt, None, p)[1]).abs().max() > 1e-2, a
    return ckpt, paths, jobs, refs


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
def test_mixed_batch_matches_peft_alone(adapters, backend):
    """Every kernel path: the native CPU kernels, the device-agnostic torch ops, and the Triton kernels
    (on the GPU where there is one, else interpreted on the CPU)."""
    if backend == "triton" and not kernels.triton_available(TRITON_DEVICE):
        pytest.skip(f"triton kernels unavailable: {kernels.triton_unavailable_reason()}")
    ckpt, paths, jobs, refs = adapters
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device=device))
    cfg = EngineConfig(max_batch_size=16, max_tokens_per_step=256, max_seq_len=128, attention_backend=backend)
    with ServingCore(loaded, cfg) as core:
        for kind, path in paths.items():
            core.register_adapter(kind, path)
        results = run_in_waves(core, jobs, SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=TOP))
    for (adapter, _), res, (ref_tokens, ref_lp) in zip(jobs, results, refs):
        name = adapter or "base"
        assert res.error is None, (name, res.error)
        assert res.finish_reason == FinishReason.LENGTH
        assert res.token_ids == ref_tokens, name
        ours = torch.tensor([lp.logprob for lp in res.logprobs])
        theirs = ref_lp[torch.arange(NEW), torch.tensor(ref_tokens)]
        torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4, msg=name)
        for step, lp in enumerate(res.logprobs):
            top_ids = [t for t, _ in lp.top]
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), ref_lp[step, top_ids], atol=2e-4, rtol=1e-4)


def test_base_rows_match_plain_generate(tiny_checkpoints):
    """Base-model rows, mixed with adapter-free neighbours of other lengths, give exactly what
    transformers' own generate gives for each prompt alone (EOS handling included)."""
    ckpt = tiny_checkpoints["qwen2"]
    plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    jobs = [("", p) for p in prompts(6)]
    with ServingCore(loaded, EngineConfig(max_batch_size=4, max_seq_len=128)) as core:
        results = run_in_waves(core, jobs, SamplingParams(max_new_tokens=NEW))
    for (_, p), r in zip(jobs, results):
        out = plain.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False)
        expected = out[0, len(p):].tolist()
        assert r.token_ids == expected
        assert r.finish_reason == (FinishReason.EOS if expected[-1] == loaded.tokenizer.eos_token_id else FinishReason.LENGTH)
