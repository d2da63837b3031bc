"""The Triton kernels (engine/kernels/triton_ops.py: paged attention and LoRA for CUDA) against
the torch reference and naive float64 math. On a machine without a GPU they run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1 there), so the same kernels are checked
everywhere; on a GPU they run compiled."""
from __future__ import annotations

import pytest
import torch

from hotswap.server.engine import kernels
from hotswap.server.engine.kernels import lora_plan
from test_kernels import CHUNKS, LORA_TOL, SHAPES, SLOT_PATTERNS, TOLERANCE, lora_case, naive_attention, naive_lora, paged_case

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", autouse=True)
def needs_triton():
    if not kernels.triton_available(DEVICE):
        pytest.skip(f"triton kernels unavailable: {kernels.triton_unavailable_reason() or 'no CUDA and TRITON_INTERPRET unset'}")


def on_device(case: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def attend(case, scale, window, backend, softcap=0.0, sinks=None):
    out = torch.full_like(case["query"], 123.0)
    kernels.paged_attention(out, case["query"], case["key_cache"], case["value_cache"], case["block_tables"],
                            case["token_rows"], case["token_positions"], scale, window, softcap, sinks, backend=backend)
    return out.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,KVH,D", SHAPES)
@pytest.mark.parametrize("block_size,window", [(16, 0), (5, 7)])
def test_triton_attention_matches_reference(dtype, H, KVH, D, block_size, window):
    """Decode tokens and prefill chunks of several rows (interleaved, shuffled block tables, never-written
    slots holding NaN), GQA groups 1-4, head dims that are not powers of two, sliding windows."""
    base = paged_case(dtype, H, KVH, D, block_size, CHUNKS, seed=D + block_size, interleave=True)
    case = on_device(base)
    scale = 0.7 * D**-0.5
    got = attend(case, scale, window, "triton")
    ref = attend(case, scale, window, "torch")
    skip = base["token_rows"] < 0
    assert (got[skip] == 123.0).all(), "tokens of no row must be left untouched"
    assert got.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got[~skip].float(), ref[~skip].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got[~skip].double(), naive_attention(base, scale, window)[~skip], atol=tol, rtol=tol)


def test_triton_attention_softcap_and_sinks():
    """Gemma 2's soft-capping and GPT-OSS's sinks, which the native kernel lacks, run in the Triton kernel."""
    base = paged_case(torch.float32, 9, 3, 64, 16, CHUNKS, interleave=True)
    case = on_device(base)
    sinks = torch.randn(9, generator=torch.Generator().manual_seed(3))
    skip = base["token_rows"] < 0
    for softcap, sink in [(0.5, None), (0.0, sinks), (0.5, sinks)]:
        got = attend(case, 0.125, 20, "triton", softcap, None if sink is None else sink.to(DEVICE))
        want = naive_attention(base, 0.125, 20, softcap, sink)
        assert (got[skip] == 123.0).all()
        torch.testing.assert_close(got[~skip].double(), want[~skip], atol=2e-5, rtol=2e-5)
        assert not torch.allclose(got[~skip].double(), naive_attention(base, 0.125, 20)[~skip], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", sorted(SLOT_PATTERNS))
def test_triton_lora_matches_reference(dtype, pattern):
    """Shrink then expand over decode-like, run-like and scattered slot patterns (tiles of 16 tokens of a
    slot, slots of rank 0-32 in 32-wide slots whose unused rows hold NaN, tokens without LoRA, y a strided
    slice of a wider output)."""
    IN, OUT = 100, 70
    base = lora_case(dtype, IN, OUT, SLOT_PATTERNS[pattern], seed=IN + len(pattern))
    case = on_device(base)
    slots, ranks = case["slots"], case["ranks"]
    want_t, want_delta = naive_lora(base)
    atol, rtol = LORA_TOL[dtype]
    t = torch.full((len(slots), 32), 9.0, device=DEVICE)
    kernels.lora_shrink(t, case["x"], case["a"], slots, ranks, backend="triton")
    assert (t.cpu()[base["slots"] < 0] == 0).all()
    torch.testing.assert_close(t.cpu().double(), want_t, atol=1e-5 if dtype == torch.float32 else 1e-4, rtol=1e-4)

    t_in = want_t.float()
    t_in[want_t == 0] = float("nan")  # past the rank: must not be read
    y = case["fused"].clone()
    plan = kernels.lora_plan(slots, ranks.numel())  # shared by a step's calls
    kernels.lora_expand(y[:, 8: 8 + OUT], t_in.to(DEVICE), case["b"], slots, ranks, backend="triton", plan=plan)
    y = y.cpu()
    untouched = torch.ones_like(y, dtype=torch.bool)
    untouched[base["slots"] >= 0, 8: 8 + OUT] = False
    assert torch.equal(y[untouched], base["fused"][untouched]), "rows without LoRA and columns outside y changed"
    want_y = base["fused"][:, 8: 8 + OUT].double() + want_delta
    torch.testing.assert_close(y[:, 8: 8 + OUT].double(), want_y, atol=atol, rtol=rtol)


@pytest.mark.parametrize("pattern", sorted(SLOT_PATTERNS))
def test_lora_plan_tiles_each_token_once(pattern):
    """Pure torch (no Triton): every token with a slot sits in exactly one tile of its slot, tiles hold
    1..16 tokens, the empty tiles come last, and the table's size depends only on the token count."""
    slots = torch.tensor(SLOT_PATTERNS[pattern], dtype=torch.int32)
    plan = lora_plan(slots, 8)
    order, tiles = plan.order.tolist(), plan.tiles.tolist()
    seen = []
    for first, count, slot in tiles:
        members = order[first: first + count]
        assert all(SLOT_PATTERNS[pattern][i] == slot for i in members)
        seen += members
    assert sorted(seen) == [i for i, s in enumerate(SLOT_PATTERNS[pattern]) if s >= 0]
    counts = [c for _, c, _ in tiles]
    assert all(0 <= c <= 16 for c in counts) and counts == sorted(counts, key=lambda c: c == 0)
    assert len(tiles) <= len(slots) and len(tiles) == lora_plan(torch.full_like(slots, -1), 8).tiles.shape[0]
