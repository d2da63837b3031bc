"""Where a steady decode step's time goes: 64 base-model rows on the default model,
driven through Engine.step on this thread (the only one computing, see
server/hotswap/server/cpu_threads.py), profiled with cProfile over whole steps.

    python bench/profile_step.py [--rows 64] [--steps 64] [--lora 64 [--kind lora-qv]]

--lora N: the rows run N distinct all-linear LoRA adapters (r8/16/32) of bench_engine.py's set
in ~/.cache/hotswap/bench (run bench_engine.py once to create it), row i adapter i % N;
--kind lora-qv takes the q,v adapters of its 1,000-adapter run instead (ranks 8-64).

Prints milliseconds per step for the calls that take the most time (cProfile's
own overhead included, a few percent)."""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

from hotswap.server.config import AdapterCacheConfig, EngineConfig, ModelConfig
from hotswap.server.engine.engine import Engine
from hotswap.server.engine.host_memory import bound_cpu_kernel_caches
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore

from bench_engine import prompts
from machine import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--lora", type=int, default=0, help="distinct all-linear LoRA adapters over the rows (0: base only)")
    ap.add_argument("--kind", default="lora", choices=["lora", "lora-qv"], help="which of bench_engine.py's adapter sets")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache/hotswap/bench")
    args = ap.parse_args()
    bound_cpu_kernel_caches()
    loaded = load_base_model(ModelConfig(quantization="none"))
    cfg = EngineConfig(max_batch_size=args.rows, max_loras=max(1, args.lora), kv_cache_bytes=2**30)
    batch = prompts(loaded.tokenizer, args.rows)
    adapters = [""] * args.rows
    if args.lora:
        paths = sorted(args.workdir.glob(f"{args.kind}-[0-9]*"))[: args.lora]
        if len(paths) < args.lora:
            raise SystemExit(f"{args.workdir} holds {len(paths)} all-linear LoRA adapters; run bench/bench_engine.py once")
        # The serving core's adapter store and cache, its loop stopped: this thread drives the engine.
        core = ServingCore(loaded, cfg, AdapterCacheConfig(device_bytes=8 * 2**30, host_bytes=16 * 2**30))
        ids = []
        for i, path in enumerate(paths):
            core.register_adapter(f"lora-{i}", path)
            ids.append(core.resolve(f"lora-{i}"))
            core.adapters.load(ids[-1])
        core.loop.shutdown()
        engine = core.engine
        adapters = [ids[i % args.lora] for i in range(args.rows)]
    else:
        engine = Engine(loaded, cfg)

    def run(new_tokens: int) -> int:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        for p, adapter in zip(batch, adapters):
            engine.add_row(engine.make_row(GenerateRequest(prompt_ids=p, adapter_id=adapter, params=params), lambda e: None))
        engine.step()  # the prompts' prefill: not profiled
        engine.take_events()
        steps = 0
        while engine.has_work:
            engine.step()
            engine.take_events()
            steps += 1
        return steps

    run(16)  # warm-up: kernels built, shapes seen
    start = time.perf_counter()
    steps = run(args.steps)
    plain = (time.perf_counter() - start) / steps
    prof = cProfile.Profile()
    prof.enable()
    steps = run(args.steps)
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt / steps
    lora = f" --lora {args.lora}" + (f" --kind {args.kind}" if args.kind != "lora" else "") if args.lora else ""
    print(f"`python bench/profile_step.py --rows {args.rows} --steps {args.steps}{lora}` on {cpu_name()}, {loaded.dtype}: "
          f"a decode step of {args.rows} rows takes {plain * 1e3:.1f} ms ({total * 1e3:.1f} ms under cProfile)\n")
    print("| call | ms per step (own time) | calls per step |\n|---|---|---|")
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:16]
    for (path, line, name), (_, calls, own, _cum, _) in rows:
        where = name if path == "~" else f"{path.rsplit('/', 1)[-1]}:{line}({name})"
        print(f"| {where} | {own / steps * 1e3:.2f} | {calls / steps:.0f} |")


if __name__ == "__main__":
    main()
