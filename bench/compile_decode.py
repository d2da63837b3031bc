"""torch.compile on the CPU decode path (issue 11, item 8: compile where it wins, measure both).

Four engines on the default model in bf16 take turns over the same 64-row batch (engine_turns.py):

- the packed forward with linears prepacked for oneDNN (the engine's default on CPU);
- the same through fixed decode buffers (--decode-graphs; engine/static_decode.py: a
  decode-only step runs from buffers padded to a bucket, so a compiled forward sees one shape
  per bucket and never recompiles for the batch's contents);
- fixed buffers with plain linears (what the compiled variant starts from);
- torch.compile(dynamic=False) of the decoder over the fixed buffers, with inductor's freezing
  (it prepacks the weights itself: its oneDNN lowering cannot take the engine's prepacked linears).

    python bench/compile_decode.py [--rounds 6]

Prints each variant's warm-up (for the compiled one: tracing and compiling bucket 64), median
prefill and decode step, and appends them to bench/RESULTS.md."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine.engine import Engine
from hotswap.server.model.loader import load_base_model

from bench_engine import prompts
from engine_turns import parse_rounds, run, take_turns
from machine import cpu_name

HERE = Path(__file__).parent


def engine(prepack: bool, compiled: bool, buffers: bool = True) -> Engine:
    loaded = load_base_model(ModelConfig(quantization="none"))
    eng = Engine(loaded, EngineConfig(max_batch_size=64, kv_cache_bytes=2**29, decode_graphs=buffers, prepack_linears=prepack))
    if compiled:
        import torch._inductor.config as inductor

        inductor.freezing = True
        static = eng.runner.static
        static._forward = torch.compile(static._forward, dynamic=False)
    return eng


def main() -> None:
    rounds = parse_rounds(__doc__)
    engines = {
        "eager, prepacked linears, packed forward (the engine's default)": engine(prepack=True, compiled=False, buffers=False),
        "eager, prepacked linears, fixed decode buffers": engine(prepack=True, compiled=False),
        "eager, plain linears, fixed decode buffers": engine(prepack=False, compiled=False),
        "torch.compile (inductor, freezing), plain linears, fixed decode buffers": engine(prepack=False, compiled=True),
    }
    batch = prompts(next(iter(engines.values())).tokenizer, 64)
    warm = {}
    for name, eng in engines.items():
        start = time.perf_counter()
        run(eng, batch, 8)
        warm[name] = time.perf_counter() - start
    table = take_turns(engines, batch, rounds, "decode path")
    for name, eng in engines.items():
        buffered = f", {eng.runner.static.steps} buffered steps" if eng.runner.static else ""
        table = table.replace(f"| {name} |", f"| {name} (warm-up {warm[name]:.1f} s{buffered}) |")
    head = f"`python bench/compile_decode.py --rounds {rounds}` on {cpu_name()}, torch {torch.__version__}, 64 rows"
    print(head + "\n\n" + table)
    with open(HERE / "RESULTS.md", "a") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} — torch.compile on the decode path (CPU)\n\n{head}\n\n{table}\n")


if __name__ == "__main__":
    main()
