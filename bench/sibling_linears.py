"""What running sibling linears as one matmul (engine/packed_linears.py: a layer's q/k/v, and
its gate/up) does to a whole engine step, on the default model in bf16: three engines in one
process — no siblings, q/k/v only, q/k/v and gate/up — take turns over the same 64-row batch
(its prefill step, then 32 decode steps), so drifts of this shared machine hit all three alike.

    python bench/sibling_linears.py [--rounds 6]

Prints the median prefill-step and decode-step time of each (and the best decode step)."""
from __future__ import annotations

import argparse
import statistics
import time

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine import packed_linears
from hotswap.server.engine.engine import Engine
from hotswap.server.engine.host_memory import bound_cpu_kernel_caches
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model

from bench_engine import prompts
from machine import cpu_name

VARIANTS = {
    "each linear its own matmul": (),
    "q/k/v as one": (("q_proj", "k_proj", "v_proj"),),
    "q/k/v and gate/up as one (the engine's)": packed_linears.SIBLINGS,
}


def run(engine: Engine, batch: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """Seconds of the batch's prefill step and of its mean decode step."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for p in batch:
        engine.add_row(engine.make_row(GenerateRequest(prompt_ids=p, params=params), lambda e: None))
    start = time.perf_counter()
    engine.step()
    engine.take_events()
    prefill = time.perf_counter() - start
    start, steps = time.perf_counter(), 0
    while engine.has_work:
        engine.step()
        engine.take_events()
        steps += 1
    return prefill, (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    bound_cpu_kernel_caches()
    engines = {}
    for name, siblings in VARIANTS.items():
        packed_linears.SIBLINGS = siblings  # read when the engine packs its model: each variant loads its own
        loaded = load_base_model(ModelConfig(quantization="none"))
        engines[name] = Engine(loaded, EngineConfig(max_batch_size=64, kv_cache_bytes=2**29))
    packed_linears.SIBLINGS = VARIANTS["q/k/v and gate/up as one (the engine's)"]
    batch = prompts(loaded.tokenizer, 64)
    for engine in engines.values():
        run(engine, batch, 8)  # warm-up: kernels built, shapes seen
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            times[name].append(run(engine, batch, 32))
    print(f"`python bench/sibling_linears.py --rounds {args.rounds}` on {cpu_name()}, {loaded.dtype}, 64 rows\n")
    print("| linears | prefill step, median ms | decode step, median ms | best decode step, ms |\n|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(t[0] for t in ts) * 1e3:.1f} | {statistics.median(t[1] for t in ts) * 1e3:.2f} "
              f"| {min(t[1] for t in ts) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
