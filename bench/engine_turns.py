"""Engines of one process taking turns over the same 64-row batch — its prefill step, then 32
decode steps — so drifts of this shared machine hit every variant alike. Used by the benches
that compare one engine change on whole steps (sibling_linears.py, fused_rotary.py)."""
from __future__ import annotations

import argparse
import statistics
import time

from hotswap.server.engine.engine import Engine
from hotswap.server.engine.host_memory import bound_cpu_kernel_caches
from hotswap.server.engine.request import GenerateRequest, SamplingParams


def parse_rounds(doc: str) -> int:
    """The bench's --rounds (default 6); bounds torch's CPU kernel caches as the server does."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    rounds = ap.parse_args().rounds
    bound_cpu_kernel_caches()
    return rounds


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


def take_turns(engines: dict[str, Engine], batch: list[list[int]], rounds: int, column: str) -> str:
    """The markdown table of each engine's median prefill step, median and best decode step."""
    for engine in engines.values():
        run(engine, batch, 8)  # warm-up: kernels built, shapes seen
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            times[name].append(run(engine, batch, 32))
    lines = [f"| {column} | prefill step, median ms | decode step, median ms | best decode step, ms |", "|---|---|---|---|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {statistics.median(t[0] for t in ts) * 1e3:.1f} | {statistics.median(t[1] for t in ts) * 1e3:.2f} "
                     f"| {min(t[1] for t in ts) * 1e3:.2f} |")
    return "\n".join(lines)
