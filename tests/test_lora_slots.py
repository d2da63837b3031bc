"""The LoRA slot tensors (engine/lora.py, LoraSlots): an adapter loaded into a slot that held
another leaves nothing of the previous one — its rows past the new rank and its linears the new
adapter does not target read as zero — whatever order ranks and targets come in."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hotswap.server.adapters.weights import LoraModuleWeights, LoraWeights
from hotswap.server.engine.lora import LoraContext, LoraDelta, LoraSlots, LoraStep, attach_lora


def adapter(gen: torch.Generator, ranks: dict[str, int]) -> LoraWeights:
    return LoraWeights({name: LoraModuleWeights(torch.randn(r, 8, generator=gen), torch.randn(6, r, generator=gen), 0.5)
                        for name, r in ranks.items()})


def test_reloading_a_slot_clears_what_the_previous_adapter_left():
    linears = {"q": nn.Linear(8, 6), "v": nn.Linear(8, 6)}
    slots = LoraSlots(linears, max_loras=3, device=torch.device("cpu"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    first = adapter(gen, {"q": 8, "v": 4})
    slots.load(1, first)
    slots.load(2, adapter(gen, {"q": 2}))  # another slot: must be left alone by what follows
    kept = {n: (slots.a[n][2].clone(), slots.b[n][2].clone()) for n in linears}
    slots.load(1, adapter(gen, {"q": 3}))  # lower rank, and no longer targets v
    assert slots.ranks["q"][1] == 3 and slots.ranks["v"][1] == 0
    assert (slots.a["q"][1, 3:] == 0).all() and (slots.b["q"][1, 3:] == 0).all()
    assert (slots.a["v"][1] == 0).all() and (slots.b["v"][1] == 0).all()
    slots.load(1, adapter(gen, {"q": 16}))  # grows the rank capacity: new rows start at zero too
    assert slots.rank_cap == 16 and slots.ranks["q"][1] == 16 and (slots.a["v"][1] == 0).all()
    slots.load(0, adapter(gen, {"v": 17}))  # capacity grows to a power of two: 17 -> 32
    assert slots.rank_cap == 32 and (slots.a["q"][1, 16:] == 0).all() and slots.ranks["v"][0] == 17
    for n in linears:
        assert torch.equal(slots.a[n][2, : kept[n][0].shape[0]], kept[n][0])
        assert (slots.a[n][2, kept[n][0].shape[0]:] == 0).all()
    slots.load(1, first)  # back to the first: exactly its weights (B with the scale folded in)
    assert torch.equal(slots.a["q"][1, :8], first.modules["q"].a) and (slots.a["q"][1, 8:] == 0).all()
    assert torch.allclose(slots.b["v"][1, :4], (first.modules["v"].b * 0.5).T) and (slots.b["v"][1, 4:] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_one_rows_step_reaches_every_row_a_linear_runs_over(backend):
    """A model run row by row (own_attention.py) may run a linear over the row's cached past as well as its new
    tokens (Doge's dt_proj, DeepSeek's kv_b_proj): all of it is that row's, so every row gets its adapter.
    Tokens of several rows against more rows than tokens cannot be matched up: a clear error, not a kernel's."""
    from hotswap.server.engine import kernels

    if backend == "native" and not kernels.native_available():
        pytest.skip(f"native kernels unavailable: {kernels.native_unavailable_reason()}")
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(8, 6)
    slots = LoraSlots({"q": lin}, max_loras=3, device=torch.device("cpu"), dtype=torch.float32)
    weights = adapter(gen, {"q": 4})
    slots.load(1, weights)
    ctx = LoraContext(slots)
    lin.register_forward_hook(LoraDelta("q", ctx))
    x = torch.randn(1, 5, 8, generator=gen)  # [1, 3 cached + 2 new, in]
    with torch.no_grad():
        base = lin(x)
        m = weights.modules["q"]
        want = base + 0.25 * (x @ m.a.T @ m.b.T)  # the module's scale 0.5 times the request's 0.5
        ctx.step = LoraStep.of(torch.tensor([1, 1], dtype=torch.int32), torch.tensor([0.5, 0.5]), 3, backend, one_row=True)
        torch.testing.assert_close(lin(x), want)
        ctx.step = LoraStep.of(torch.tensor([1, -1], dtype=torch.int32), None, 3, backend)  # two rows' tokens
        with pytest.raises(RuntimeError, match="LoRA on q: the model ran it over 5 rows for 2 tokens"):
            lin(x)


def test_engines_sharing_a_model_each_apply_only_their_own_adapters():
    """attach_lora wraps a linear's forward (whatever it was: here another wrapper, as packed_linears.py installs)
    once; a second engine on the same model adds its own parts to that wrapper, and each applies its adapter
    only during its own forwards: the other engine's step leaves it out, and no step leaves the bare linear."""
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 6))
    model.get_output_embeddings = lambda: None  # (as a transformers model without an output head)
    lin = model[0]
    original = lin.forward
    calls = []
    lin.forward = lambda x: (calls.append(1), original(x))[1]  # an earlier replacement stays underneath
    first, second = (attach_lora(model, 2, torch.device("cpu"), torch.float32) for _ in range(2))
    a, b = adapter(gen, {"0": 4}), adapter(gen, {"0": 2})
    first.load(0, a)
    second.load(1, b)
    assert type(vars(lin)["forward"]).__name__ == "LoraForward" and len(vars(lin)["forward"].deltas) == 2
    x = torch.randn(3, 8, generator=gen)
    with torch.no_grad():
        base = original(x)
        delta = {name: 0.5 * (x @ w.modules["0"].a.T @ w.modules["0"].b.T) for name, w in (("a", a), ("b", b))}
        assert torch.equal(lin(x), base)  # no engine is stepping
        first.step = LoraStep.of(torch.tensor([0, -1, 0], dtype=torch.int32), None, 2, "torch")
        torch.testing.assert_close(lin(x), base + delta["a"] * torch.tensor([[1.0], [0.0], [1.0]]))
        first.step, second.step = None, LoraStep.of(torch.tensor([1, 1, -1], dtype=torch.int32), None, 2, "torch")
        torch.testing.assert_close(lin(x), base + delta["b"] * torch.tensor([[1.0], [1.0], [0.0]]))
    assert len(calls) == 3


def test_expert_adapters_take_only_the_expert_slots_and_other_adapters_leave_those_free():
    """Expert adapters (LoRA on MoE expert / router weights) fit only the first max_expert_loras slots, whose tables
    hold every expert; other adapters take the remaining slots first and those only when nothing else is idle."""
    from hotswap.server.engine.lora_slots import LoraSlotTable

    table = LoraSlotTable(max_loras=4, expert_slots=2)
    assert table.acquire("plain-a") == (2, True) and table.acquire("plain-b") == (3, True)
    assert table.acquire("experts-a", experts=True) == (0, True)
    assert table.acquire("plain-c") == (1, True)  # only an expert slot is idle: a plain adapter may take it
    assert table.acquire("experts-b", experts=True) is None  # both expert slots busy: it waits
    assert table.busy == 4 and table.expert_busy == 2
    table.release(2)  # a plain slot frees up: still no room for an expert adapter
    assert table.acquire("experts-b", experts=True) is None
    table.release(1)
    assert table.acquire("experts-b", experts=True) == (1, True)  # evicts plain-c from the expert slot
    assert "plain-c" not in table.slot_of
    table.release(0)
    assert table.acquire("experts-a", experts=True) == (0, False)  # still resident: no copy


def _expert_weights(gen: torch.Generator, key: str, experts: int, rank: int) -> LoraWeights:
    from hotswap.server.adapters.weights import ParamLoraWeights

    return LoraWeights({}, params={key: ParamLoraWeights(torch.randn(experts, rank, 8, generator=gen),
                                                         torch.randn(experts, 6, rank, generator=gen), 0.5)})


def test_slot_tables_that_cannot_fit_are_refused_before_any_slot_changes():
    """Growing LoRA slot tables past the memory the device has left is refused with RESOURCE_EXHAUSTED naming the
    setting to lower, before anything is allocated (here: tables for an absurd number of slots; nothing mocked)."""
    from hotswap.server.engine.expert_lora import ParamSlots
    from hotswap.server.errors import ResourceExhausted
    from hotswap.server.model.experts import ParamFeatures

    gen = torch.Generator().manual_seed(2)
    cpu = torch.device("cpu")
    huge = LoraContext(LoraSlots({"q": nn.Linear(8, 6)}, max_loras=10**10, device=cpu, dtype=torch.float32))
    with pytest.raises(ResourceExhausted, match="--max-loras") as err:
        huge.load(0, adapter(gen, {"q": 4}))
    assert err.value.field == "adapter_id" and huge.slots.a == {}

    key = "layers.0.mlp.experts.down_proj"
    ctx = LoraContext(LoraSlots({"q": nn.Linear(8, 6)}, max_loras=4, device=cpu, dtype=torch.float32))
    ctx.params = ParamSlots({key: ParamFeatures(4, 8, 6)}, capacity=2, device=cpu, dtype=torch.float32)
    ctx.load(0, _expert_weights(gen, key, 4, 2))
    assert ctx.params.a[key].shape == (2 * 4, 8, 8)  # two expert slots of 4 experts, rank capacity 8
    with pytest.raises(ValueError, match="only slots below max_expert_loras"):
        ctx.load(3, _expert_weights(gen, key, 4, 2))
    ctx.params = ParamSlots({key: ParamFeatures(4, 8, 6)}, capacity=10**10, device=cpu, dtype=torch.float32)
    with pytest.raises(ResourceExhausted, match="--max-expert-loras"):
        ctx.load(0, LoraWeights({"q": adapter(gen, {"q": 2}).modules["q"]}, params=_expert_weights(gen, key, 4, 2).params))
    assert ctx.params.a == {} and ctx.slots.a == {}  # the linear part was not loaded either


def test_a_containers_memory_limit_counts_its_working_set_not_its_page_cache(tmp_path):
    """Under a cgroup v2 limit, what is left is the limit minus usage less inactive file pages (weights read through the
    page cache count as usage but are reclaimed before anything is killed); no limit: None (MemAvailable decides)."""
    from hotswap.server.engine.device_memory import cgroup_available

    (tmp_path / "memory.max").write_text("8589934592\n")
    (tmp_path / "memory.current").write_text("8000000000\n")
    (tmp_path / "memory.stat").write_text("anon 1000000000\nfile 7000000000\nactive_file 1000000000\ninactive_file 6000000000\n")
    assert cgroup_available(tmp_path) == 8589934592 - (8000000000 - 6000000000)
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_available(tmp_path) is None
    assert cgroup_available(tmp_path / "absent") is None
