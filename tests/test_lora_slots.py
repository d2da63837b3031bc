"""The LoRA slot tensors (engine/lora.py, LoraSlots): an adapter loaded into a slot that held
another leaves nothing of the previous one — its rows past the new rank and its linears the new
adapter does not target read as zero — whatever order ranks and targets come in."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hotswap.server.adapters.weights import LoraModuleWeights, LoraWeights
from hotswap.server.engine.lora import LoraContext, LoraDelta, LoraSlots, LoraStep


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
