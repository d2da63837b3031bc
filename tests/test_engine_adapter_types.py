"""DoRA, LoRA with lora_B bias, IA3, a per-request LoRA scale and a weighted combination of
LoRA adapters, all in one continuous batch with plain LoRA, prompt tuning, prefix tuning and
base rows: each row gets the greedy tokens (fp32) PEFT's PeftModel gives running it alone."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hotswap.server.adapters.adaption import adaption_weights
from hotswap.server.adapters.load import load_adapter
from hotswap.server.adapters.validate import BaseShape

from hotswap.server.config import AdapterCacheConfig, EngineConfig, ModelConfig
from hotswap.server.engine.request import FinishReason, GenerateRequest, SamplingParams
from hotswap.server.errors import AdapterIncompatible, InvalidArgument
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from peft_fixtures import save_adapter
from test_engine_fidelity import NEW, prompts, reference

KINDS = {  # Qwen2: q/k/v have biases (lora_bias and trained base biases need them), the head is tied to the embedding
    "qwen2": ["dora", "lora_bias", "ia3", "lora_heads", "lora_embed", "lora_tokens", "tokens", "lora", "lora_mlp", "prompt_random", "prefix",
              "lora_trained_bias", "lora_bias_all", "adalora_heads"],
    # Llama: untied head; LLaMA-Adapter runs on Llama / Mistral only
    "llama": ["adaption", "dora", "ia3", "lora_heads", "lora_embed", "lora_tokens", "tokens", "lora", "lora_mlp", "prompt_random", "prefix",
              "adalora_heads"],
}
SCALE = 0.5
WEIGHTS = (0.7, -0.4)  # combination of "lora" and "lora_mlp"


def _peft(ckpt, paths, adapter: str, scale: float = 1.0, combine: tuple[float, float] | None = None):
    """PeftModel on a fresh fp32 base: one adapter (rescaled like PEFT's set_scale) or
    add_weighted_adapter(["lora", "lora_mlp"], WEIGHTS, combination_type="cat")."""
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    if combine is None:
        model = PeftModel.from_pretrained(base, paths[adapter], adapter_name="chosen")
        for layer in model.modules():
            if isinstance(layer, LoraLayer) and scale != 1.0:  # AdaLoRA's scaling is alpha, which set_scale(1) would make alpha / r
                layer.set_scale("chosen", scale)  # PEFT's per-layer scaling = scale * alpha / r
        return model.eval()
    model = PeftModel.from_pretrained(base, paths["lora"], adapter_name="lora")
    model.load_adapter(paths["lora_mlp"], adapter_name="lora_mlp")
    model.add_weighted_adapter(["lora", "lora_mlp"], list(combine), "mix", combination_type="cat")
    model.set_adapter("mix")
    return model.eval()


def _build(tiny_checkpoints, tmp_path_factory, arch: str):
    ckpt = tiny_checkpoints[arch]
    root = tmp_path_factory.mktemp(f"adapter-types-{arch}")
    paths = {kind: save_adapter(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), kind, root / kind, seed=20 + i)
             for i, kind in enumerate(KINDS[arch])}
    # (adapter_id, lora_scale, combination) per row
    jobs = [(k, 1.0, None) for k in KINDS[arch]] + [("", 1.0, None), ("lora", SCALE, None), ("lora_mlp", 3.0, None),
                                                    ("", 1.0, [("lora", WEIGHTS[0]), ("lora_mlp", WEIGHTS[1])]), ("lora", 1.0, None)]
    if "lora_bias" in paths:  # set_scale scales lora_B's bias with the rest of the delta
        jobs.append(("lora_bias", 2.0, None))
    ids = prompts(len(jobs))
    same = ids[KINDS[arch].index("lora")] * 3  # a long prompt under "lora", its scale and a combination: each keys its own
    for i, (adapter, _, combo) in enumerate(jobs):  # prefix-cache blocks (the repeated plain row may hit the first's)
        if adapter == "lora" or combo:
            ids[i] = same
    refs = []
    for (adapter, scale, combo), p in zip(jobs, ids):
        if combo is not None:
            model = _peft(ckpt, paths, "", combine=WEIGHTS)
        elif adapter:
            model = _peft(ckpt, paths, adapter, scale)
        else:
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        refs.append(reference(ckpt, None, p, model=model))
    base_lp = [reference(ckpt, None, p)[1] for p in ids]
    for (adapter, _, combo), (_, lp), blp in zip(jobs, refs, base_lp):
        if adapter or combo:  # each adapter really changes the model, so matching PEFT means applying it
            assert (lp - blp).abs().max() > 1e-2, adapter
    return ckpt, paths, jobs, ids, refs


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    return _build(tiny_checkpoints, tmp_path_factory, "qwen2")


@pytest.fixture(scope="module")
def llama_setup(tiny_checkpoints, tmp_path_factory):
    return _build(tiny_checkpoints, tmp_path_factory, "llama")


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_new_adapter_types_mixed_in_one_batch_match_peft_alone(arch, backend, request):
    ckpt, paths, jobs, ids, refs = request.getfixturevalue("setup" if arch == "qwen2" else "llama_setup")
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    # Small blocks and step budget: prompts are chunked across steps and full blocks reach the prefix cache.
    cfg = EngineConfig(max_batch_size=16, max_tokens_per_step=16, block_size=4, max_seq_len=128, max_loras=8, attention_backend=backend)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=0)
    with ServingCore(loaded, cfg) as core:
        for kind, path in paths.items():
            core.register_adapter(kind, path)
        streams = []
        for wave in (jobs[:6], jobs[6:12], jobs[12:]):  # each wave lands while the previous one decodes
            streams += [core.submit(GenerateRequest(prompt_ids=ids[len(streams) + i], adapter_id=a, lora_scale=s, adapters=c, params=params))
                        for i, (a, s, c) in enumerate(wave)]
            next(iter(streams[-1]))
        results = [s.result(timeout=120) for s in streams]
    for (adapter, scale, combo), res, (ref_tokens, ref_lp) in zip(jobs, results, refs):
        name = f"{adapter or ('combination' if combo else 'base')} scale={scale}"
        assert res.error is None, (name, res.error)
        assert res.finish_reason == FinishReason.LENGTH
        assert res.token_ids == ref_tokens, name
        ours = torch.tensor([lp.logprob for lp in res.logprobs])
        torch.testing.assert_close(ours, ref_lp[torch.arange(NEW), torch.tensor(ref_tokens)], atol=2e-4, rtol=1e-4, msg=name)


def test_per_request_controls_refuse_what_they_cannot_express(setup):
    ckpt, paths, _, ids, _ = setup
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    params = SamplingParams(max_new_tokens=2)
    with ServingCore(loaded, EngineConfig(max_seq_len=64), AdapterCacheConfig(max_lora_rank=8)) as core:
        for kind in ("dora", "ia3", "lora", "lora_mlp", "prefix", "lora_heads", "lora_bias", "lora_bias_all"):
            core.register_adapter(kind, paths[kind])
        res = core.generate(GenerateRequest(prompt_ids=ids[0], adapters=[("lora", 0.5), ("lora_mlp", 0.5)], params=params), timeout=60)
        assert isinstance(res.error, AdapterIncompatible) and "max_lora_rank" in str(res.error), res.error  # v_proj: 4 + 6 > 8
        for adapter in ("dora", "ia3", "prefix", "lora_heads", "lora_bias_all"):  # not linear in a scale (set_scale leaves base biases)
            res = core.generate(GenerateRequest(prompt_ids=ids[0], adapter_id=adapter, lora_scale=2.0, params=params), timeout=60)
            assert isinstance(res.error, AdapterIncompatible) and res.error.field == "lora_scale", (adapter, res.error)
        for other in ("dora", "ia3", "prefix", "lora_heads", "lora_bias", "lora_bias_all"):
            res = core.generate(GenerateRequest(prompt_ids=ids[0], adapters=[("lora", 0.5), (other, 0.5)], params=params), timeout=60)
            assert isinstance(res.error, AdapterIncompatible) and res.error.field == "adapters", (other, res.error)
        ok = core.generate(GenerateRequest(prompt_ids=ids[0], adapter_id="lora", lora_scale=0.0, params=params), timeout=60)
        base = core.generate(GenerateRequest(prompt_ids=ids[0], params=params), timeout=60)
        assert ok.error is None and ok.token_ids == base.token_ids  # scale 0 is the base model
        with pytest.raises(InvalidArgument) as e:  # "lora" and "lora@1" are one version
            core.submit(GenerateRequest(prompt_ids=ids[0], adapters=[("lora", 0.5), ("lora@1", 0.5)], params=params))
        assert e.value.field == "adapters"
    bad = [dict(lora_scale=float("nan"), adapter_id="lora"), dict(lora_scale=-1.0, adapter_id="lora"), dict(lora_scale=11.0, adapter_id="lora"),
           dict(lora_scale=2.0), dict(adapters=[]), dict(adapters=[("lora", float("inf"))]), dict(adapters=[("", 1.0)]),
           dict(adapters=[("a", 1.0)] * 2), dict(adapters=[("lora", 1.0)], adapter_id="lora"),
           dict(adapters=[(f"a{i}", 0.1) for i in range(9)])]
    for kw in bad:
        with pytest.raises(InvalidArgument) as e:
            GenerateRequest(prompt_ids=[1, 2], **kw)
        assert e.value.field in ("lora_scale", "adapters"), kw


def _edit(src, dst, config: dict | None = None, tensors=None):
    """A copy of a saved adapter with config fields replaced and/or tensors rewritten."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if tensors is not None:
        save_file(tensors(load_file(dst / "adapter_model.safetensors")), dst / "adapter_model.safetensors")
    return dst


def test_malformed_checkpoints_of_the_new_types_are_refused_naming_the_field(setup, llama_setup, tmp_path):
    ckpt, paths, *_ = setup
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    first = lambda t, part: next(k for k in t if part in k)  # noqa: E731
    cases = [
        ("dora", {"use_dora": "yes"}, None, InvalidArgument, "use_dora"),
        ("dora", {"lora_bias": True}, None, InvalidArgument, "lora_bias"),  # PEFT refuses DoRA + lora_bias too
        ("dora", {"use_dora": False}, None, AdapterIncompatible, "use_dora"),  # magnitudes the config does not announce
        ("dora", None, lambda t: {**t, first(t, "magnitude"): t[first(t, "magnitude")][:5]}, AdapterIncompatible, "use_dora"),
        ("lora_bias", None, lambda t: {k: v for k, v in t.items() if not k.endswith("lora_B.bias")}, AdapterIncompatible, "lora_bias"),
        ("lora_bias", None, lambda t: {**t, first(t, "lora_B.bias"): t[first(t, "lora_B.bias")][None]}, AdapterIncompatible, "lora_bias"),
        ("ia3", {"feedforward_modules": 3}, None, InvalidArgument, "feedforward_modules"),
        ("ia3", None, lambda t: {**t, first(t, "down_proj"): t[first(t, "down_proj")].T}, AdapterIncompatible, "feedforward_modules"),
        ("ia3", None, lambda t: {**t, "base_model.model.model.embed_tokens.ia3_l": torch.ones(1, 64)}, AdapterIncompatible, "target_modules"),
        ("ia3", {"modules_to_save": ["norm"]}, lambda t: {**t, "base_model.model.model.norm.weight": torch.ones(64)}, AdapterIncompatible,
         "modules_to_save"),
        ("lora_heads", {"modules_to_save": "lm_head"}, None, InvalidArgument, "modules_to_save"),
        ("lora_heads", None, lambda t: {**t, first(t, "lm_head"): t[first(t, "lm_head")][:, :10].contiguous()}, AdapterIncompatible, "modules_to_save"),
        ("lora_heads", {"ensure_weight_tying": True}, None, AdapterIncompatible, "ensure_weight_tying"),
        ("lora_heads", None, lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.ones(2, 64)}, AdapterIncompatible, "target_modules"),
        ("lora_tokens", {"trainable_token_indices": [3, 5]}, None, AdapterIncompatible, "trainable_token_indices"),
        ("lora_tokens", {"trainable_token_indices": list(range(10**6, 10**6 + 80))}, None, AdapterIncompatible, "trainable_token_indices"),
        ("tokens", {"token_indices": "3,4"}, None, AdapterIncompatible, "token_indices"),
        ("lora_embed", None, lambda t: {k: v for k, v in t.items() if not k.endswith("lora_embedding_B")}, AdapterIncompatible, "target_modules"),
        ("lora_embed", None, lambda t: {k: v + 1 if k.endswith("base_layer.weight") else v for k, v in t.items()}, AdapterIncompatible,
         "target_modules"),  # a different embedding table on a tied base
        ("lora_embed", {"use_dora": True}, lambda t: {**t, **{k.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(64)
                                                              for k in t if "o_proj.lora_A" in k}}, AdapterIncompatible, "use_dora"),
    ]
    for i, (kind, config, tensors, error, field) in enumerate(cases):
        with pytest.raises(error) as e:
            load_adapter(_edit(paths[kind], tmp_path / str(i), config, tensors), "x", model, 64)
        assert e.value.field == field, (i, e.value)
    qwen_model, (llama, llama_paths, *_) = model, llama_setup
    with pytest.raises(AdapterIncompatible, match="llama, mistral") as e:  # PEFT's query states differ elsewhere (q_norm, ...)
        adaption_weights({}, load_file(llama_paths["adaption"] / "adapter_model.safetensors"), BaseShape.of(qwen_model), qwen_model)
    assert e.value.field == "peft_type"
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    for i, (config, tensors, field) in enumerate([
        ({"adapter_len": 0}, None, "adapter_len"),
        ({"adapter_layers": 3}, None, "adapter_layers"),
        (None, lambda t: {k: v for k, v in t.items() if "layers.2." not in k}, "adapter_layers"),  # not the top layers
        (None, lambda t: {k: v[:, :2].contiguous() if k.endswith("prompt") else v for k, v in t.items()}, "adapter_len"),
        ({"target_modules": "mlp"}, None, "target_modules"),
    ]):
        with pytest.raises((InvalidArgument, AdapterIncompatible)) as e:
            load_adapter(_edit(llama_paths["adaption"], tmp_path / f"a{i}", config, tensors), "x", model, 64)
        assert e.value.field == field, (i, e.value)


def test_modules_to_save_names_that_wrap_nothing_are_ignored_as_peft_does(setup, tmp_path):
    """PEFT 0.22 adds "pre_classifier" to every classifier's modules_to_save. A name the model lacks wraps
    nothing and saves no tensor, so PeftModel runs as without it; the loader ignores it too, while a name
    whose tensors the checkpoint holds is still refused (test above, "norm")."""
    ckpt, paths, *_ = setup
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    edited = _edit(paths["lora_heads"], tmp_path / "x", {"modules_to_save": ["lm_head", "embed_tokens", "pre_classifier", "no_such"]})
    a, b = load_adapter(edited, "x", model, 64).weights, load_adapter(paths["lora_heads"], "y", model, 64).weights
    assert a.modules.keys() == b.modules.keys()
    assert len(a.tensors()) == len(b.tensors()) and all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
