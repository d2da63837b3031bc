"""Two costs behind this engine's CPU step shapes, on the default model's widths in bf16:

- a pass over the model's 211 linears (prepacked, as the engine runs them) at token
  counts oneDNN has already built kernels for, at counts it meets for the first time
  (what pacing makes of nearly every mixed step), and at counts on the scheduler's
  32-token grid (engine/scheduler.py, STEP_GRID);
- RMSNorm: transformers' Llama module against the native kernel (engine/fused_norms.py)
  at decode (64 rows) and prefill (2,048 rows);
- sibling linears (engine/packed_linears.py): a layer's q/k/v and gate/up projections as
  separate prepacked matmuls against one matmul of their stacked weights, at 64 and 2,048 rows.

    python bench/token_counts.py

Prints a section for bench/RESULTS.md."""
from __future__ import annotations

import random
import time

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hotswap.server.engine import kernels
from hotswap.server.engine.host_memory import bound_cpu_kernel_caches
from hotswap.server.engine.packed_linears import pack_weight, packed_linear

from machine import cpu_name

HIDDEN, KV, FFN, LAYERS = 576, 192, 1536, 30
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)] * LAYERS


def linear_pass_ms(weights: dict, counts: list[int]) -> float:
    """Mean milliseconds of one pass over SHAPES, a pass per token count (the first two not counted)."""
    times = []
    for m in counts:
        x = {i: torch.randn(m, i, dtype=torch.bfloat16) for i in (HIDDEN, FFN)}
        t = time.perf_counter()
        for o, i in SHAPES:
            packed_linear(x[i], weights[(o, i)], None)
        times.append(time.perf_counter() - t)
    return sum(times[2:]) / len(times[2:]) * 1e3


def best_us(fn, reps: int = 50) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps // 5):
            fn()
        best = min(best, (time.perf_counter() - t) / (reps // 5))
    return best * 1e6


def main() -> None:
    bound_cpu_kernel_caches()  # as the server does
    weights = {s: pack_weight(torch.randn(*s, dtype=torch.bfloat16), 64) for s in set(SHAPES)}
    rnd = random.Random(0)
    fresh = rnd.sample(range(100, 230), 22)  # each count met once
    seen = [160] * 22
    grid = [c // 32 * 32 for c in fresh]  # the same counts put on the grid: 4 distinct
    linears = {"one count, seen before": linear_pass_ms(weights, seen),
               "a new count each pass (100–229)": linear_pass_ms(weights, fresh),
               "those counts on the 32-token grid": linear_pass_ms(weights, grid)}

    norm = LlamaRMSNorm(HIDDEN, eps=1e-5).to(torch.bfloat16)
    norms = {}
    have_native = kernels.native_available()
    for rows in (64, 2048):
        x = torch.randn(rows, HIDDEN, dtype=torch.bfloat16)
        with torch.inference_mode():
            own = best_us(lambda: norm(x))
            fused = best_us(lambda: kernels.rms_norm(x, norm.weight, 1e-5, False, backend="native")) if have_native else float("nan")
        norms[rows] = (own, fused)

    siblings = {}
    for group, widths in (("q/k/v", (HIDDEN, KV, KV)), ("gate/up", (FFN, FFN))):
        parts = [torch.randn(w, HIDDEN, dtype=torch.bfloat16) for w in widths]
        apart = [pack_weight(w, 64) for w in parts]
        stacked = pack_weight(torch.cat(parts), 64)
        for rows in (64, 2048):
            x = torch.randn(rows, HIDDEN, dtype=torch.bfloat16)
            with torch.inference_mode():
                siblings[group, rows] = (best_us(lambda: [packed_linear(x, w, None) for w in apart]),
                                         best_us(lambda: packed_linear(x, stacked, None).split(widths, dim=-1)))

    print(f"`python bench/token_counts.py` on {cpu_name()}, torch {torch.__version__}\n")
    print("| 211 prepacked bf16 linears (the default model's shapes), one pass | ms |\n|---|---|")
    for name, ms in linears.items():
        print(f"| {name} | {ms:.1f} |")
    print("\n| RMSNorm, 576 wide, bf16 | transformers' LlamaRMSNorm, µs | native kernel, µs |\n|---|---|---|")
    for rows, (own, fused) in norms.items():
        print(f"| {rows} rows | {own:.0f} | {fused:.0f} |")
    print("\n| sibling linears, one layer, bf16 prepacked | separate matmuls, µs | one stacked matmul, µs |\n|---|---|---|")
    for (group, rows), (apart, stacked) in siblings.items():
        print(f"| {group}, {rows} rows | {apart:.0f} | {stacked:.0f} |")
    new, on_grid = linears["a new count each pass (100–229)"], linears["those counts on the 32-token grid"]
    print("\n| target | measured | goal | met / NOT met |\n|---|---|---|---|")
    print(f"| linear pass on the grid / at new counts | {on_grid / new:.2f}× | < 1 | {'met' if on_grid < new else 'NOT met'} |")
    for rows, (own, fused) in norms.items():
        print(f"| RMSNorm kernel / module, {rows} rows | {fused / own:.2f}× | < 1 | {'met' if fused < own else 'NOT met'} |")
    for (group, rows), (apart, stacked) in siblings.items():
        print(f"| {group} stacked / separate, {rows} rows | {stacked / apart:.2f}× | ≤ 1 | {'met' if stacked <= apart else 'NOT met'} |")


if __name__ == "__main__":
    main()
