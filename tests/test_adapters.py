"""Adapter files, materialisation against PEFT's own modules, validation errors, the two-tier cache."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hotswap.server.adapters.cache import AdapterCache
from hotswap.server.adapters.load import load_adapter
from hotswap.server.adapters.registry import check_adapter_id
from hotswap.server.adapters.weights import LoraWeights, PrefixWeights, PromptWeights
from hotswap.server.config import AdapterCacheConfig
from hotswap.server.errors import AdapterIncompatible, InvalidArgument, NotFound, ResourceExhausted
from conftest import save_tiny_checkpoint
from peft_fixtures import KINDS, save_adapter
from tiny_archs import ARCHS as MORE_ARCHS


@pytest.fixture(scope="module")
def base(tiny_checkpoints):
    return tiny_checkpoints["llama"]


def fp32(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {k: save_adapter(fp32(base), k, root / k, seed=i) for i, k in enumerate(KINDS)}


@pytest.mark.parametrize("kind", ["lora", "lora_mlp", "rslora", "adalora", "adalora_pruned"])
def test_lora_family_delta_equals_peft_layer(base, saved, kind):
    model = fp32(base)
    adapter = load_adapter(saved[kind], kind, model, max_lora_rank=64)
    assert isinstance(adapter.weights, LoraWeights) and adapter.weights.modules
    peft = PeftModel.from_pretrained(fp32(base), saved[kind]).eval()
    gen = torch.Generator().manual_seed(0)
    for name, m in adapter.weights.modules.items():
        x = torch.randn(2, 3, m.a.shape[1], generator=gen)
        with torch.no_grad():
            ours = model.get_submodule(name)(x) + ((x @ m.a.T) @ m.b.T) * m.scale
            torch.testing.assert_close(ours, peft.base_model.model.get_submodule(name)(x), atol=1e-5, rtol=1e-5)


def test_prompt_and_prefix_tensors_equal_peft_get_prompt(base, saved):
    for kind in ("prompt_random", "prompt_text", "ptuning"):
        adapter = load_adapter(saved[kind], kind, fp32(base), 64)
        peft = PeftModel.from_pretrained(fp32(base), saved[kind]).eval()
        assert isinstance(adapter.weights, PromptWeights)
        torch.testing.assert_close(adapter.weights.embeddings, peft.get_prompt(batch_size=1)[0].float())
    for kind in ("prefix", "prefix_proj"):
        adapter = load_adapter(saved[kind], kind, fp32(base), 64)
        peft = PeftModel.from_pretrained(fp32(base), saved[kind]).eval()
        cache = peft.get_prompt(batch_size=1)
        assert isinstance(adapter.weights, PrefixWeights)
        for layer in range(adapter.weights.keys.shape[0]):
            torch.testing.assert_close(adapter.weights.keys[layer], cache.layers[layer].keys[0].float())
            torch.testing.assert_close(adapter.weights.values[layer], cache.layers[layer].values[0].float())


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_file_errors(base, saved, tmp_path):
    model = fp32(base)
    with pytest.raises(NotFound, match="does not exist"):
        load_adapter(tmp_path / "absent", "x", model, 64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidArgument, match="adapter_config.json"):
        load_adapter(empty, "x", model, 64)
    pickled = _copy(saved["lora"], tmp_path / "pickled")
    tensors = load_file(pickled / "adapter_model.safetensors")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(tensors, pickled / "adapter_model.bin")
    with pytest.raises(InvalidArgument, match="refusing pickle checkpoint 'adapter_model.bin'"):
        load_adapter(pickled, "x", model, 64)
    broken = _copy(saved["lora"], tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        load_adapter(broken, "x", model, 64)
    nan = _copy(saved["lora"], tmp_path / "nan")
    t = load_file(nan / "adapter_model.safetensors")
    save_file({k: v.fill_(float("nan")) for k, v in t.items()}, nan / "adapter_model.safetensors")
    with pytest.raises(InvalidArgument, match="NaN"):
        load_adapter(nan, "x", model, 64)
    for i, bad in enumerate([float("nan"), float("inf"), -float("inf")]):  # one element of one tensor is enough
        one = _copy(saved["lora"], tmp_path / f"one-bad-{i}")
        t = load_file(one / "adapter_model.safetensors")
        last = sorted(t)[-1]
        t[last].view(-1)[t[last].numel() // 2] = bad
        save_file(t, one / "adapter_model.safetensors")
        with pytest.raises(InvalidArgument, match=f"NaN or inf \\(tensor '{last}'\\)"):
            load_adapter(one, "x", model, 64)


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_incompatibilities_name_the_mismatch(base, saved, tmp_path):
    model = fp32(base)
    odd = _copy(saved["lora"], tmp_path / "odd")
    _edit_config(odd, peft_type="LOHA")
    with pytest.raises(AdapterIncompatible, match="peft_type 'LOHA'") as e:
        load_adapter(odd, "x", model, 64)
    assert e.value.field == "peft_type"
    with pytest.raises(AdapterIncompatible, match="rank 4 .* above the configured maximum 2") as e:
        load_adapter(saved["lora"], "x", model, max_lora_rank=2)
    assert e.value.field == "r"
    dora = _copy(saved["lora"], tmp_path / "dora")  # DoRA serves, but a config promising it needs its magnitudes
    _edit_config(dora, use_dora=True)
    with pytest.raises(AdapterIncompatible, match="use_dora is on but .* lacks a lora_magnitude_vector") as e:
        load_adapter(dora, "x", model, 64)
    assert e.value.field == "use_dora"

    # Adapters made by PEFT on other tiny models: wider hidden size, more layers, other head layout.
    def variant(**changes):
        cfg = AutoModelForCausalLM.from_pretrained(base).config
        return AutoModelForCausalLM.from_config(cfg.__class__(**{**cfg.to_dict(), **changes}))

    cases = [("lora", {"hidden_size": 96}, "hidden_size", "hidden size"),
             ("prompt_random", {"hidden_size": 96}, "hidden_size", "hidden size"),
             ("lora", {"num_hidden_layers": 5}, "num_layers", "layer count"),
             ("prefix", {"num_hidden_layers": 5}, "num_layers", "layer count"),
             ("prefix", {"num_key_value_heads": 4}, "head_layout", "head layout")]
    for i, (kind, changes, field, pattern) in enumerate(cases):
        path = save_adapter(variant(**changes), kind, tmp_path / f"other-{i}")
        with pytest.raises(AdapterIncompatible, match=pattern) as e:
            load_adapter(path, "x", model, 64)
        assert e.value.field == field, (kind, changes)
    # LoRA on a module the base does not have.
    ghost = _copy(saved["lora"], tmp_path / "ghost")
    t = load_file(ghost / "adapter_model.safetensors")
    t = {k.replace("q_proj", "qkv_fused"): v for k, v in t.items()}
    save_file(t, ghost / "adapter_model.safetensors")
    with pytest.raises(AdapterIncompatible, match="target modules absent.*qkv_fused") as e:
        load_adapter(ghost, "x", model, 64)
    assert e.value.field == "target_modules"


def _save_lora(model, out, **options):
    """A LoRA PEFT creates and saves with `options`, its weights nudged off their initial values."""
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, **options))
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.1)
    peft.save_pretrained(out)
    return out


def test_lora_options_that_change_what_peft_loads_are_refused(base, saved, tmp_path):
    """PeftModel.from_pretrained rebuilds these from adapter_config.json in ways the saved A/B alone do not
    say: PiSSA / OLoRA subtract their initial delta from the base weight again, KaSA truncates it, layer
    replication adds layers, VeLoRA / MonteCLoRA save tensors of their own. Serving the A/B as plain LoRA
    would silently differ from PEFT (PiSSA's and OLoRA's rows did, before these were refused)."""
    model = fp32(base)
    qv = ["q_proj", "v_proj"]
    cases = [(dict(target_modules=qv, init_lora_weights="pissa"), "init_lora_weights"),
             (dict(target_modules=qv, init_lora_weights="pissa_niter_2"), "init_lora_weights"),
             (dict(target_modules=qv, init_lora_weights="olora"), "init_lora_weights"),
             (dict(target_modules=qv, kasa_config={}), "kasa_config"),
             (dict(target_modules=qv, velora_config={}), "velora_config"),
             (dict(target_modules=qv, monteclora_config={}), "monteclora_config"),
             (dict(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 3]]), "layer_replication")]
    for i, (options, field) in enumerate(cases):
        path = _save_lora(fp32(base), tmp_path / f"opt-{i}", **options)
        with pytest.raises(AdapterIncompatible) as e:
            load_adapter(path, "x", model, 64)
        assert e.value.field == field, (options, e.value)
    astra = _copy(saved["lora"], tmp_path / "astra")  # PEFT 0.22's ASTRA needs preprocess_astra to create; it rewrites the base too
    _edit_config(astra, init_lora_weights="astra")
    with pytest.raises(AdapterIncompatible) as e:
        load_adapter(astra, "x", model, 64)
    assert e.value.field == "init_lora_weights"
    # bias="all" on GPT-2 also trains the LayerNorms' biases: not a linear the engine can shift.
    gpt2 = save_tiny_checkpoint(MORE_ARCHS["gpt2"](), tmp_path / "gpt2")
    path = _save_lora(fp32(gpt2), tmp_path / "gpt2-bias-all", target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    with pytest.raises(AdapterIncompatible, match="ln_1.*not a linear") as e:
        load_adapter(path, "x", fp32(gpt2), 64)
    assert e.value.field == "bias"


def test_every_lora_variant_peft_knows_is_served_or_refused_by_name(base, saved, tmp_path):
    """PEFT marks the LoraConfig fields that select a variant with a forward of its own; hotswap serves
    DoRA and names each other one in its refusal. A variant a later PEFT adds is refused too, by its field."""
    from hotswap.server.adapters.lora import _UNSUPPORTED, _variant_fields

    assert "use_dora" in _variant_fields() and _variant_fields() <= set(_UNSUPPORTED) | {"use_dora"}
    for option in sorted(_variant_fields() - {"use_dora"}):
        path = _copy(saved["lora"], tmp_path / option)
        _edit_config(path, **{option: {"x": 1}})
        with pytest.raises(AdapterIncompatible) as e:
            load_adapter(path, "x", fp32(base), 64)
        assert e.value.field == option


def test_nora_initialised_lora_serves_as_plain_lora(base, tmp_path):
    """NoRA (PEFT 0.22) only normalises A's initial columns; PeftModel.from_pretrained leaves the base as it
    is, so the saved A/B are served like any LoRA's."""
    path = _save_lora(fp32(base), tmp_path / "nora", target_modules=["q_proj", "v_proj"], init_lora_weights="nora")
    plain = _copy(path, tmp_path / "plain")
    _edit_config(plain, init_lora_weights=True)
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(fp32(base), path).eval()(input_ids=ids).logits,
                           PeftModel.from_pretrained(fp32(base), plain).eval()(input_ids=ids).logits)
    a, b = (load_adapter(p, "x", fp32(base), 64).weights for p in (path, plain))
    assert a.modules.keys() == b.modules.keys() and all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def test_weights_the_config_does_not_target_are_refused(base, saved, tmp_path):
    """PEFT wraps the modules adapter_config.json targets and drops saved tensors of any other module
    (a warning, no error): a checkpoint whose config leaves some of its modules out would otherwise be
    served with changes PEFT does not make."""
    model = fp32(base)
    for i, changes in enumerate([{"target_modules": ["o_proj"]},  # "lora" holds q/k/v/o
                                 {"layers_to_transform": [2], "layers_pattern": "layers"},
                                 {"target_modules": r".*\.(q|k|v)_proj"},
                                 {"exclude_modules": ["k_proj"]}]):
        path = _copy(saved["lora"], tmp_path / f"cfg-{i}")
        _edit_config(path, **changes)
        peft = PeftModel.from_pretrained(fp32(base), path).eval()
        ids = torch.tensor([[5, 17, 99, 3]])
        with torch.no_grad():  # what PEFT serves really differs from applying every saved tensor
            full = PeftModel.from_pretrained(fp32(base), saved["lora"]).eval()
            assert (peft(input_ids=ids).logits - full(input_ids=ids).logits).abs().max() > 1e-3, changes
        with pytest.raises(AdapterIncompatible, match="does not target") as e:
            load_adapter(path, "x", model, 64)
        assert e.value.field == "target_modules", changes
    # Spelled differently but targeting the same modules: accepted.
    same = _copy(saved["lora"], tmp_path / "same")
    _edit_config(same, target_modules=r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj", base_model_name_or_path="elsewhere/other")
    assert set(load_adapter(same, "x", model, 64).weights.modules) == set(load_adapter(saved["lora"], "x", model, 64).weights.modules)


def test_adapter_ids_cannot_escape_the_store():
    for bad in ["../etc", "a/b", "/abs", "", "x" * 200, "..", "name@v1"]:
        with pytest.raises(InvalidArgument):
            check_adapter_id(bad)
    assert check_adapter_id("support-bot_v2.1@3") == "support-bot_v2.1@3"


# -- the cache ---------------------------------------------------------------------
@pytest.fixture()
def cache_env(base, saved):
    model = fp32(base)
    calls: list[str] = []
    gate = threading.Event()
    gate.set()

    def load(adapter_id):
        calls.append(adapter_id)
        gate.wait()
        return load_adapter(saved[adapter_id], adapter_id, model, 64)

    sizes = {k: load_adapter(saved[k], k, model, 64).nbytes for k in ("lora", "lora_mlp", "adalora", "prefix")}
    return load, calls, gate, sizes


def _acquire(cache, adapter_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (a := cache.acquire(adapter_id)) is None:
        assert time.monotonic() < deadline
        cache.wait_idle(timeout)
    return a


def test_load_statistics_stay_bounded_as_loads_go_on(cache_env, monkeypatch):
    """A server loads adapters for as long as it runs: the per-load lists keep the most recent few for
    percentiles, and the histogram (what Prometheus reads) still counts every load."""
    from hotswap.server.adapters import cache as cache_module

    load, calls, gate, sizes = cache_env
    monkeypatch.setattr(cache_module, "RECENT_SAMPLES", 2)
    one = max(sizes["lora"], sizes["lora_mlp"], sizes["adalora"])
    cache = AdapterCache(AdapterCacheConfig(device_bytes=one + 8, host_bytes=10**8), load, torch.device("cpu"), torch.float32)
    for name in ("lora", "lora_mlp", "adalora", "lora", "lora_mlp"):  # one at a time: 3 from disk, then 2 from the host tier
        _acquire(cache, name)
        cache.release(name)
    stats = cache.stats()
    assert stats.loads == 5 and sum(stats.load_buckets) == 5 and stats.load_seconds > 0
    assert len(stats.load_durations) == 2 and len(stats.promote_durations) == 2 and len(stats.room_waits) == 2
    cache.close()


def test_cache_lru_pinning_and_in_use(cache_env):
    load, calls, gate, sizes = cache_env
    budget = sizes["lora"] + sizes["lora_mlp"] + 8
    cache = AdapterCache(AdapterCacheConfig(device_bytes=budget, host_bytes=10 * budget), load, torch.device("cpu"), torch.float32)
    a = _acquire(cache, "lora")
    b = _acquire(cache, "lora_mlp")
    cache.release("lora_mlp")
    cache.release("lora")
    _acquire(cache, "lora")  # touch: lora_mlp is now least recently used
    cache.release("lora")
    _acquire(cache, "adalora")
    assert set(cache.stats().device) == {"lora", "adalora"} and cache.stats().evictions == 1
    cache.release("adalora")
    cache.pin("lora")
    for name in ("lora_mlp", "adalora", "lora_mlp"):
        _acquire(cache, name)
        cache.release(name)
        assert "lora" in cache.stats().device  # pinned never leaves
    # Reload from the host tier: no second disk read, identical tensors.
    before = calls.count("lora_mlp")
    assert before == 1
    again = _acquire(cache, "lora_mlp")
    assert all(torch.equal(x, y) for x, y in zip(again.weights.tensors(), b.weights.tensors()))
    assert a is cache.acquire("lora")


def test_cache_load_is_async_and_failures_surface_once(cache_env):
    load, calls, gate, sizes = cache_env
    cache = AdapterCache(AdapterCacheConfig(device_bytes=10**8, host_bytes=10**8), load, torch.device("cpu"), torch.float32)
    woke = threading.Event()
    cache.on_ready = woke.set
    gate.clear()
    start = time.monotonic()
    assert cache.acquire("lora") is None and cache.acquire("lora") is None
    assert time.monotonic() - start < 0.5  # never blocks the engine thread
    gate.set()
    assert woke.wait(10)
    assert cache.acquire("lora") is not None and calls.count("lora") == 1

    def failing(adapter_id):
        raise NotFound(f"unknown adapter {adapter_id!r}", field="adapter_id")

    cache.load_fn = failing
    assert cache.acquire("missing") is None
    cache.wait_idle(10)
    with pytest.raises(NotFound):
        cache.acquire("missing")
    assert cache.acquire("missing") is None  # the next request retries
    cache.wait_idle(10)


def test_cache_refuses_an_adapter_bigger_than_the_budget_and_waits_for_busy_ones(cache_env):
    load, calls, gate, sizes = cache_env
    small = AdapterCache(AdapterCacheConfig(device_bytes=sizes["lora"] - 1, host_bytes=10**8), load, torch.device("cpu"), torch.float32)
    with pytest.raises(ResourceExhausted, match="more than the whole device budget"):
        small.load("lora")
    one = AdapterCache(AdapterCacheConfig(device_bytes=max(sizes["lora"], sizes["adalora"]) + 8, host_bytes=10**8), load,
                       torch.device("cpu"), torch.float32)
    _acquire(one, "lora")  # in use by a running row
    assert one.acquire("adalora") is None
    time.sleep(0.3)
    assert "lora" in one.stats().device and one.acquire("adalora") is None  # waits, does not evict a busy adapter
    one.release("lora")
    assert _acquire(one, "adalora") is not None and "lora" not in one.stats().device
