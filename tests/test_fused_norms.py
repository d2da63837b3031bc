"""RMSNorms in bf16 / fp16 on CPU run through the native kernel (engine/fused_norms.py):
chosen by what a module computes, never for fp32 (the reference) or under autograd, and
the engine's tokens and log-probs stay those of the modules' own forwards."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine import kernels, runner
from hotswap.server.engine.fused_norms import fuse_norms
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from conftest import save_tiny_checkpoint
from peft_fixtures import save_adapter
from tiny_archs import ARCHS

CPU = torch.device("cpu")
NEAR_TIE = 0.05
"""Log-prob gap (nats) under which two tokens are a tie that bf16 rounding may flip."""
pytestmark = pytest.mark.skipif(not kernels.native_available(), reason="native kernels unavailable on this machine")


class WeightFirstRMSNorm(nn.Module):
    """Multiplies by the weight in fp32 and rounds once (as some architectures do)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (self.weight.float() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def randomised(m: nn.Module, dtype: torch.dtype) -> nn.Module:
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.5 + 1)
    return m.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norms_are_fused_by_what_they_compute(dtype):
    model = nn.ModuleDict({
        "llama": randomised(LlamaRMSNorm(64, eps=1e-5), dtype),  # rounds, then the weight
        "weight_first": randomised(WeightFirstRMSNorm(48), dtype),
        "gemma": randomised(GemmaRMSNorm(64), dtype),  # x * (1 + weight): not what the kernel computes
        "layer_norm": nn.LayerNorm(64).to(dtype),  # has a bias and subtracts the mean
        "linear": nn.Linear(64, 64, bias=False).to(dtype),
    })
    own = {name: m.forward for name, m in model.items()}
    assert fuse_norms(model, CPU, dtype) == 2
    assert fuse_norms(model, CPU, dtype) == 2  # a second engine on the same model wraps nothing twice
    assert {name for name, m in model.items() if m.forward != own[name]} == {"llama", "weight_first"}
    step = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    gen = torch.Generator().manual_seed(2)  # fixed rows: the kernel and the module round alike on them
    with torch.inference_mode():
        for name in ("llama", "weight_first"):
            width = model[name].weight.shape[0]
            for shape in [(1, width), (3, 5, width), (300, width)]:
                x = (torch.randn(shape, generator=gen) * 2).to(dtype)
                got, want = model[name](x), own[name](x)
                assert got.shape == want.shape and got.dtype == dtype
                assert ((got.float() - want.float()).abs() <= want.float().abs() * step + 1e-6).all(), (name, shape)
    x = torch.randn(4, 64, dtype=dtype, requires_grad=True)  # training on the model: the module's own forward
    model["llama"](x).sum().backward()
    assert x.grad is not None


def test_fp32_models_are_not_fused():
    model = nn.Sequential(LlamaRMSNorm(32))
    assert fuse_norms(model, CPU, torch.float32) == 0 and "forward" not in vars(model[0])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_engine_tokens_are_the_same_fused_or_not(tiny_checkpoints, tmp_path, monkeypatch, arch):
    """bf16, a mixed batch of LoRA, prefix and base rows: greedy tokens and log-probs with the
    norms fused equal those with the modules' own forwards (qwen3 also norms queries and keys
    per head; gemma3's 1 + weight norms stay unfused)."""
    ckpt = tiny_checkpoints[arch] if arch in tiny_checkpoints else save_tiny_checkpoint(ARCHS[arch](), tmp_path / arch)
    paths = {k: save_adapter(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), k, tmp_path / k, seed=i)
             for i, k in enumerate(["lora", "prefix"])}
    gen = torch.Generator().manual_seed(5)
    jobs = [(a, torch.randint(3, 400, (n,), generator=gen).tolist()) for a, n in [("lora", 9), ("prefix", 12), ("", 30), ("", 4)]]
    params = SamplingParams(max_new_tokens=8, logprobs=3)
    results, counts = {}, {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(runner, "fuse_norms", lambda *a: 0)
        loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="bfloat16", device="cpu"))
        noise = torch.Generator().manual_seed(7)
        with torch.no_grad():  # norm weights away from their all-ones initialisation, alike in both runs
            for name, p in loaded.model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn(p.shape, generator=noise).to(p.dtype) * 0.1)
        with ServingCore(loaded, EngineConfig(max_batch_size=8, max_seq_len=128)) as core:
            counts[fused] = core.engine.runner.fused_norms
            for k, p in paths.items():
                core.register_adapter(k, p)
            streams = [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=params)) for a, p in jobs]
            results[fused] = [s.result(timeout=120) for s in streams]
    assert counts[False] == 0 and (counts[True] > 0) == (arch != "gemma3")
    for fused, own in zip(results[True], results[False]):
        assert fused.error is None and own.error is None
        assert agree_up_to_a_near_tie(fused, own), (fused.token_ids, own.token_ids)


def agree_up_to_a_near_tie(fused, own) -> bool:
    """Same tokens with log-probs within bf16 noise, until (if ever) the fused run picks
    another token where the modules' own forward had it within NEAR_TIE of its choice —
    random tiny models put many tokens within a rounding step of each other."""
    for a, b in zip(fused.logprobs, own.logprobs):
        if a.token_id != b.token_id:
            top = dict(b.top)
            return top.get(a.token_id, -float("inf")) >= b.logprob - NEAR_TIE
        if abs(a.logprob - b.logprob) > 2e-2:
            return False
    return fused.token_ids == own.token_ids
