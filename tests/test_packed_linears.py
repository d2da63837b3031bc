"""bf16 linears on CPU run with weights packed once (engine/packed_linears.py): the same
numbers as torch's own F.linear, the same tokens through the engine with LoRA, DoRA,
prompt and prefix rows in one batch, and nothing changes for fp32 (the reference)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine.packed_linears import can_pack, pack_linears, sibling_groups
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from conftest import save_tiny_checkpoint
from peft_fixtures import linear_paths, save_adapter
from tiny_archs import ARCHS as TINY_ARCHS

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="this CPU has no oneDNN bf16 path")


def test_a_packed_linear_computes_what_f_linear_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 160), nn.Linear(160, 96, bias=False)).to(torch.bfloat16)
    plain = [(m.weight.clone(), None if m.bias is None else m.bias.clone()) for m in model]
    assert pack_linears(model, batch_hint=16) == (2, 2 * 96 * 160 * 2)
    assert pack_linears(model, batch_hint=16) == (2, 0)  # a second engine on the same model packs nothing again
    with torch.inference_mode():
        for shape in [(1, 96), (7, 96), (64, 96), (1, 33, 96)]:
            x = torch.randn(shape, dtype=torch.bfloat16)
            for m, (w, b) in zip(model, plain):
                want = nn.functional.linear(x, w, b)
                assert torch.equal(m(x), want), shape  # small batches: the very same kernel result
                x = want
        x = torch.randn(300, 96, dtype=torch.bfloat16)  # a prefill-sized batch may block the sums differently
        torch.testing.assert_close(model[0](x), nn.functional.linear(x, *plain[0]), rtol=2e-2, atol=2e-2)
    x = torch.randn(4, 96, dtype=torch.bfloat16, requires_grad=True)  # training on the model: torch's own path
    model[0](x).sum().backward()
    assert x.grad is not None


def test_fp32_models_are_not_packed():
    assert not can_pack(torch.device("cpu"), torch.float32)
    model = nn.Linear(8, 8)
    assert pack_linears(model, 4) == (0, 0) and "forward" not in vars(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen2_moe", "phi3"])
def test_engine_tokens_are_the_same_packed_or_not(tiny_checkpoints, tmp_path, arch):
    """A mixed batch of LoRA, DoRA, prompt-tuning, prefix and base rows in bf16: greedy tokens
    and log-probs with packed linears (q/k/v and gate/up as sibling groups where the model has
    them) equal those with torch's F.linear. Qwen3 normalises its q/k slices per head; Qwen2-MoE
    has q/k/v biases and experts with their own gate/up; Phi-3 fuses qkv and gate/up itself."""
    ckpt = tiny_checkpoints[arch] if arch in tiny_checkpoints else save_tiny_checkpoint(TINY_ARCHS[arch](), tmp_path / arch)
    kinds = ["lora", "dora", "prompt_random", "prefix"]
    paths = {}
    for i, k in enumerate(kinds):
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        targets = linear_paths(model, ["q_proj", "v_proj", "o_proj", "down_proj"]) if k == "dora" else None  # not Qwen2-MoE's experts
        paths[k] = save_adapter(model, k, tmp_path / k, seed=i, **({"targets": targets} if targets else {}))
    gen = torch.Generator().manual_seed(3)
    jobs = [(a, torch.randint(3, 400, (n,), generator=gen).tolist()) for a, n in zip(kinds + ["", "lora"], [5, 9, 3, 12, 7, 30])]
    params = SamplingParams(max_new_tokens=8, logprobs=0)
    results = {}
    for packed in (True, False):
        loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="bfloat16", device="cpu"))
        with ServingCore(loaded, EngineConfig(max_batch_size=8, max_seq_len=128, prepack_linears=packed)) as core:
            assert (core.engine.runner.packed_linears > 0) == packed
            for k, p in paths.items():
                core.register_adapter(k, p)
            streams = [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=params)) for a, p in jobs]
            results[packed] = [s.result(timeout=120) for s in streams]
    for a, b in zip(results[True], results[False]):
        assert a.error is None and b.error is None
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in a.logprobs]), torch.tensor([lp.logprob for lp in b.logprobs]),
                                   rtol=0, atol=2e-2)


class _Layer(nn.Module):
    """The sibling linears a Llama layer has, one with a bias (Qwen2's q/k/v have biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(64, 96), nn.Linear(64, 32, bias=False), nn.Linear(64, 32)
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(64, 80, bias=False), nn.Linear(64, 80, bias=False), nn.Linear(80, 64)


def test_siblings_run_as_one_matmul_and_each_gets_its_own_output():
    torch.manual_seed(0)
    layer = _Layer().to(torch.bfloat16)
    plain = {n: (m.weight.clone(), None if m.bias is None else m.bias.clone()) for n, m in layer.named_children()}
    assert pack_linears(layer, batch_hint=8) == (6, sum(w.numel() * 2 for w, _ in plain.values()))
    groups = sibling_groups(layer)
    assert len(groups) == 2
    want = lambda name, x: nn.functional.linear(x, *plain[name])  # noqa: E731
    with torch.inference_mode():
        x = torch.randn(1, 7, 64, dtype=torch.bfloat16)
        q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
        for name, y in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
            assert torch.equal(y, want(name, x)), name
        # one matmul: the three outputs are slices of one buffer, handed out once
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        assert all(g._state is None for g in groups)
        # any order; a member called twice, or on another input, computes anew
        y = torch.randn(3, 64, dtype=torch.bfloat16)
        for name in ("v_proj", "q_proj", "q_proj", "k_proj"):
            assert torch.equal(getattr(layer, name)(y), want(name, y)), name
        up = layer.up_proj(x)
        other = torch.randn(1, 7, 64, dtype=torch.bfloat16)
        assert torch.equal(layer.gate_proj(other), want("gate_proj", other))  # not up's sibling slice of x
        assert torch.equal(up, want("up_proj", x))
        # a slice nobody takes holds the input until released
        z = torch.randn(2, 64, dtype=torch.bfloat16)
        layer.q_proj(z)
        assert groups[0]._state is not None and groups[0]._state[0] is z
        for g in groups:
            g.release()
        assert groups[0]._state is None
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)  # training: torch's own path, per linear
    layer.k_proj(x).sum().backward()
    assert x.grad is not None and groups[0]._state is None


def test_a_sibling_called_from_another_thread_computes_its_own():
    import threading
    torch.manual_seed(1)
    layer = _Layer().to(torch.bfloat16)
    w, b = layer.k_proj.weight.clone(), layer.k_proj.bias
    pack_linears(layer, batch_hint=8)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    out = {}
    with torch.inference_mode():
        q = layer.q_proj(x)
        t = threading.Thread(target=lambda: out.setdefault("k", _inference(layer.k_proj, x)))
        t.start()
        t.join()
        k_here = layer.k_proj(x)
    assert torch.equal(out["k"], nn.functional.linear(x, w, b))
    assert out["k"].untyped_storage().data_ptr() != q.untyped_storage().data_ptr()  # its own matmul
    assert torch.equal(k_here, out["k"])  # the other thread's call replaced this one's slices: computed again


def _inference(fn, x):
    with torch.inference_mode():
        return fn(x)
