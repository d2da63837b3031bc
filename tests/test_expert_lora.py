"""LoRA on MoE expert and router weights (PEFT's target_parameters) is served per row, in mixed batches,
with the greedy tokens (and, within float tolerance, the log-probs) PeftModel gives each row alone.

PEFT >= 0.22 turns plain last names (gate_proj / up_proj / down_proj, "all-linear") into LoRA on the
fused experts' gate_up_proj / down_proj and names like "gate" into the router's weight, so these
adapters are what a user gets by default on Qwen2-MoE and OLMoE. GPT-OSS covers experts stored
transposed, with biases and an interleaved gate/up. What the engine cannot serve exactly is refused."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from conftest import save_tiny_checkpoint
from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine import kernels
from hotswap.server.adapters.load import load_adapter
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.errors import AdapterIncompatible
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from peft_fixtures import linear_paths, save_adapter
from test_engine_fidelity import TRITON_DEVICE, reference, run_in_waves
from tiny_archs import ARCHS

NEW = 5
MLP_NAMES = ["q_proj", "gate_proj", "up_proj", "down_proj", "gate"]
# name -> (save_adapter kind, its keyword arguments); the model's own module names are filled in per architecture.
ADAPTERS = {
    "experts": ("lora", dict(r=2, alpha=4, targets=MLP_NAMES)),
    "all_linear": ("lora", dict(r=4, alpha=8, targets="all-linear")),
    "down_only": ("lora_params", dict(r=3, params=["mlp.experts.down_proj"])),
    "router_only": ("lora_params", dict(r=2, params=["mlp.gate.weight"])),
    "plain": ("lora", dict(targets=None)),  # full paths of q_proj / v_proj: linears only
    "prefix": ("prefix", {}),
}
VISIBLE = 1e-3


def _jobs(names: list[str]) -> list[tuple[str, list[int]]]:
    gen = torch.Generator().manual_seed(5)
    return [(n, torch.randint(3, 400, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist()) for n in names]


def _case(arch: str, root, adapters: dict) -> tuple:
    ckpt = save_tiny_checkpoint(ARCHS[arch](), root / "model")
    paths = {}
    for i, (name, (kind, kw)) in enumerate(adapters.items()):
        base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        if kw.get("targets", "") is None:
            kw = {**kw, "targets": linear_paths(base, ["q_proj", "v_proj"])}
        paths[name] = save_adapter(base, kind, root / name, seed=i, **kw)
    jobs = _jobs([*adapters, "", ""])
    refs = []
    for name, prompt in jobs:
        tokens, logprobs = reference(ckpt, paths.get(name), prompt, new=NEW)
        if name:  # the adapter really changes the model, so matching PEFT means applying it
            assert (logprobs - reference(ckpt, None, prompt, new=NEW)[1]).abs().max() > VISIBLE, name
        refs.append((tokens, logprobs[torch.arange(NEW), torch.tensor(tokens)]))
    return ckpt, paths, jobs, refs


@pytest.fixture(scope="module", params=["qwen2_moe", "olmoe"])
def moe_case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory.mktemp(request.param), ADAPTERS)


@pytest.fixture(scope="module")
def gpt_oss_case(tmp_path_factory):
    """GPT-OSS keeps its experts transposed, (E, in, out), with biases, gate and up interleaved and its own
    clamped gate; its router adds a bias after F.linear. Nothing converts names there: target_parameters only."""
    adapters = {"experts": ("lora_params", dict(r=2, targets=None, params=["mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                                                                            "mlp.router.weight"])),
                "down_only": ("lora_params", dict(r=3, params=["mlp.experts.down_proj"])),
                "plain": ("lora", dict(targets=None))}
    return _case("gpt_oss", tmp_path_factory.mktemp("gpt_oss"), adapters)


def _serve(ckpt, paths: dict, jobs, backend: str = "native", decode_graphs: bool = False, expert_slots: int = 4) -> list:
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device=device))
    cfg = EngineConfig(max_batch_size=8, max_tokens_per_step=16 if backend == "native" else 64, max_seq_len=48, block_size=4,
                       attention_backend=backend, decode_graphs=decode_graphs, max_loras=4, max_expert_loras=expert_slots)
    with ServingCore(loaded, cfg) as core:
        for name, path in paths.items():
            core.register_adapter(name, path)
        results = run_in_waves(core, jobs, SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=1), waves=2)
        runner = core.engine.runner
        if decode_graphs:
            assert runner.static.steps > 0
    return results


def _check(results, jobs, refs) -> None:
    for (adapter, prompt), res, (ref_tokens, ref_logprobs) in zip(jobs, results, refs):
        name = adapter or f"base ({len(prompt)} tokens)"
        assert res.error is None, (name, res.error)
        assert res.token_ids == ref_tokens, name
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in res.logprobs]), ref_logprobs, atol=2e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend,decode_graphs", [("native", False), ("torch", False), ("triton", False), ("native", True),
                                                   ("triton", True)])
def test_expert_and_router_lora_match_peft_in_a_mixed_batch(moe_case, backend, decode_graphs):
    """Two expert adapters of different ranks, LoRA on down_proj alone and on the router alone, a plain LoRA,
    prefix tuning and base rows, 4 LoRA slots for 5 LoRA adapters: slots are reloaded mid-run."""
    if backend == "triton" and not kernels.triton_available(TRITON_DEVICE):
        pytest.skip(f"triton kernels unavailable: {kernels.triton_unavailable_reason()}")
    ckpt, paths, jobs, refs = moe_case
    _check(_serve(ckpt, paths, jobs, backend, decode_graphs), jobs, refs)


def test_expert_adapters_take_turns_in_fewer_expert_slots_than_lora_slots(moe_case):
    """Four expert / router adapters, one expert slot (max_expert_loras=1) among four LoRA slots: they wait for it
    in turn, the plain LoRA, prefix and base rows run beside them, and every row still matches PEFT."""
    ckpt, paths, jobs, refs = moe_case
    _check(_serve(ckpt, paths, jobs, expert_slots=1), jobs, refs)


def test_steps_without_an_expert_adapter_run_the_models_own_experts_forward(moe_case, monkeypatch):
    """With an expert adapter loaded, steps whose rows use only linear LoRA (or none) do not pay for the
    engine's per-pair experts forward: the model's own runs, and the rows still match PEFT."""
    from hotswap.server.engine import expert_lora

    ckpt, paths, jobs, refs = moe_case
    calls = []
    real = expert_lora._grouped_linear
    monkeypatch.setattr(expert_lora, "_grouped_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32"))
    cfg = EngineConfig(max_batch_size=8, max_tokens_per_step=16, max_seq_len=48, block_size=4, max_loras=4)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=1)
    picked = [i for i, (name, _) in enumerate(jobs) if name in ("experts", "plain", "")]
    with ServingCore(loaded, cfg) as core:
        for name, path in paths.items():
            core.register_adapter(name, path)
        first = run_in_waves(core, [jobs[picked[0]]], params, waves=1)  # the expert adapter: loads its slot tables
        assert jobs[picked[0]][0] == "experts" and calls
        calls.clear()
        rest = run_in_waves(core, [jobs[i] for i in picked[1:]], params, waves=1)
        assert calls == []
    _check(first + rest, [jobs[i] for i in picked], [refs[i] for i in picked])


def test_the_default_kv_budget_leaves_room_for_the_expert_slot_tables(moe_case):
    """The engine keeps the expert / router slot tables of max_expert_loras slots at rank 16 out of the default KV
    budget (on CUDA; a CPU budget is a fraction of RAM): every expert adapter of rank <= 16 then fits in what was
    kept, whatever it targets. Counted here from the model's own parameter shapes, and against what serving the
    case's expert and router adapters (ranks 2-4) allocated."""
    from hotswap.server.model.experts import param_targets

    ckpt, paths, jobs, refs = moe_case
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32"))
    features = param_targets(loaded.model).features
    tables = 2 * 16 * sum(f.experts * (f.in_features + f.out_features) for f in features.values()) * 4  # 2 slots, fp32
    assert features and tables > 0
    cfg = EngineConfig(max_batch_size=8, max_tokens_per_step=16, max_seq_len=48, block_size=4, max_loras=4, max_expert_loras=2)
    with ServingCore(loaded, cfg) as core:
        assert core.engine.adapter_reservation() == 2 * core.adapters.cfg.device_bytes + tables
        for name, path in paths.items():
            core.register_adapter(name, path)
        results = run_in_waves(core, jobs, SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=1), waves=1)
        assert all(r.error is None for r in results)
        assert 0 < core.engine.runner.lora.params.nbytes <= tables
    dense = save_tiny_checkpoint(ARCHS["mistral"](), ckpt.parent / "dense")  # nothing kept for expert tables
    with ServingCore(load_base_model(ModelConfig(source=str(dense), dtype="float32")), cfg) as core:
        assert core.engine.adapter_reservation() == 2 * core.adapters.cfg.device_bytes


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_transposed_experts_with_biases_match_peft(gpt_oss_case, backend):
    ckpt, paths, jobs, refs = gpt_oss_case
    _check(_serve(ckpt, paths, jobs, backend), jobs, refs)


def test_lora_scale_rescales_expert_and_router_deltas_as_set_scale_does(moe_case):
    """A request's lora_scale multiplies every delta, the experts' and the router's too (PEFT's set_scale)."""
    ckpt, paths, jobs, _ = moe_case
    prompt, scale = jobs[0][1], 0.5
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), paths["experts"])
    for layer in peft.modules():
        if isinstance(layer, LoraLayer):
            layer.set_scale("default", scale)
    ref_tokens, ref_logprobs = reference(ckpt, None, prompt, new=NEW, model=peft.eval())
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    with ServingCore(loaded, EngineConfig(max_batch_size=2, max_seq_len=48, attention_backend="native")) as core:
        core.register_adapter("experts", paths["experts"])
        res = core.generate(GenerateRequest(prompt_ids=prompt, adapter_id="experts", lora_scale=scale,
                                            params=SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=1)), timeout=60)
    assert res.error is None and res.token_ids == ref_tokens
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in res.logprobs]), ref_logprobs[torch.arange(NEW), torch.tensor(ref_tokens)],
                               atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,params,reason", [
    ("llama4", ["feed_forward.experts.gate_up_proj"], "parameters of 'model.layers.0.feed_forward.experts'"),  # no layout flags
    ("gpt_oss", ["mlp.experts.down_proj_bias"], "'model.layers.0.mlp.experts.down_proj_bias' is not a parameter"),  # a bias
])
def test_parameter_targets_it_cannot_serve_are_refused_by_name(tmp_path, arch, params, reason):
    """An experts class transformers does not describe, or a parameter that is no expert / router weight:
    refused at registration, never served without its deltas."""
    ckpt = save_tiny_checkpoint(ARCHS[arch](), tmp_path / arch)
    path = save_adapter(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), "lora_params", tmp_path / "adapter", r=2,
                        params=params)
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with pytest.raises(AdapterIncompatible, match=reason) as e:
        load_adapter(path, "a", base, max_lora_rank=64)
    assert e.value.field == "target_parameters"


def test_a_router_that_casts_its_weight_is_served_in_bf16(tmp_path):
    """GLM-4.5 / DeepSeek-V3-style routers compute F.linear(x.float(), weight.float()): in a bf16 model
    the weight is cast before its one use. PEFT adds the delta before that cast; the engine adds it to the
    product, the same change up to bf16 rounding, and serves such adapters where bf16 is the default dtype."""
    import transformers as tf
    from tiny_archs import _DIMS

    cfg = tf.Glm4MoeConfig(**{**_DIMS, "intermediate_size": 32}, head_dim=16, moe_intermediate_size=32, n_routed_experts=4,
                           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)
    ckpt = save_tiny_checkpoint(cfg, tmp_path / "glm4_moe")
    path = save_adapter(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), "lora_params", tmp_path / "router", r=2,
                        params=["mlp.gate.weight"])
    prompt, bf16 = [5, 17, 99, 3, 40, 41], lambda: AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    ref_tokens, ref_logprobs = reference(ckpt, path, prompt, new=NEW, model=bf16())
    assert (ref_logprobs - reference(ckpt, None, prompt, new=NEW, model=bf16())[1]).abs().max() > 1e-2  # visible in bf16
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="bfloat16", device="cpu"))
    with ServingCore(loaded, EngineConfig(max_batch_size=2, max_seq_len=48)) as core:
        core.register_adapter("router", path)
        res = core.generate(GenerateRequest(prompt_ids=prompt, adapter_id="router",
                                            params=SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=1)), timeout=60)
    assert res.error is None and res.token_ids == ref_tokens
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in res.logprobs]),
                               ref_logprobs[torch.arange(NEW), torch.tensor(ref_tokens)], atol=1e-3, rtol=0)
