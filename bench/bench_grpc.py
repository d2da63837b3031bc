"""gRPC overhead: N concurrent streaming clients through a real hotswap-server
process vs the same workload driven in-process on the engine, in one run on one
machine, on the default SmolLM2-135M model.

    python bench/bench_grpc.py                  # 32 streams x 64 tokens, base + 4 LoRA adapters
    python bench/bench_grpc.py --streams 8 --rounds 3

The client runs in this process (asyncio SDK client, one event loop), the
server in a child process; both share the machine's cores, as a sidecar
client would. Appends a section to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from hotswap.client import AsyncClient
from hotswap.server.config import AdapterCacheConfig, EngineConfig, ModelConfig
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.serving import ServingCore

from adapters import adapter_set
from launch import start_server as start_process

HERE = Path(__file__).resolve().parent
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(8 + (i * 5) % 40)) for i in range(n)]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def summarize(wall: float, per_request: list[tuple[float, list[float], int]]) -> dict:
    """per_request: (ttft, inter-chunk gaps per token, tokens)."""
    tokens = sum(n for _, _, n in per_request)
    return {"tok_s": tokens / wall, "ttft": [t for t, _, _ in per_request], "tpot": [g for _, gs, _ in per_request for g in gs]}


def in_process(core: ServingCore, jobs: list[tuple[str, str]], new: int) -> dict:
    out: list = [None] * len(jobs)

    def one(i: int, adapter: str, prompt: str) -> None:
        t0 = time.monotonic()
        stream = core.submit(GenerateRequest(prompt=prompt, adapter_id=adapter, params=SamplingParams(max_new_tokens=new, ignore_eos=True)))
        first, last, gaps, n = None, None, [], 0
        for ev in stream:
            if ev.token_ids:
                now = time.monotonic()
                if first is None:
                    first = now - t0
                else:
                    gaps += [(now - last) / len(ev.token_ids)] * len(ev.token_ids)
                last, n = now, n + len(ev.token_ids)
        out[i] = (first, gaps, n)

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i, a, p)) for i, (a, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(time.monotonic() - t0, out)


async def through_grpc(target: str, jobs: list[tuple[str, str]], new: int) -> dict:
    async with AsyncClient(target) as c:
        async def one(adapter: str, prompt: str):
            t0 = time.monotonic()
            first, last, gaps, n = None, None, [], 0
            async for ch in c.stream(prompt, adapter=adapter, max_new_tokens=new, ignore_eos=True):
                if ch.token_ids:
                    now = time.monotonic()
                    if first is None:
                        first = now - t0
                    else:
                        gaps += [(now - last) / len(ch.token_ids)] * len(ch.token_ids)
                    last, n = now, n + len(ch.token_ids)
            return first, gaps, n

        await c.generate("warm up", max_new_tokens=2)
        t0 = time.monotonic()
        out = await asyncio.gather(*[one(a, p) for a, p in jobs])
        return summarize(time.monotonic() - t0, list(out))


def start_server(data: Path, streams: int, adapters: Path) -> tuple[subprocess.Popen, str]:
    return start_process("--metrics-port", "-1", "--data-dir", str(data), "--max-batch-size", str(streams),
                         "--max-tokens-per-step", "8192", "--max-seq-len", "1024", "--allowed-adapter-dir", str(adapters))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each; the best of each is reported")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    work = Path(tempfile.mkdtemp(prefix="hotswap-bench-grpc-"))
    from transformers import AutoModelForCausalLM

    core = ServingCore.from_config(ModelConfig(), EngineConfig(max_batch_size=args.streams, max_tokens_per_step=8192, max_seq_len=1024),
                                   AdapterCacheConfig())
    base_factory = lambda: AutoModelForCausalLM.from_pretrained(core.loaded.checkpoint_dir, dtype=torch.float32)  # noqa: E731
    paths = adapter_set(base_factory, work / "adapters", "lora", 4, [16])
    names = [f"lora{i}" for i in range(len(paths))]
    for n, p in zip(names, paths):
        core.register_adapter(n, p)
    jobs = [(names[i % 4] if i % 2 else "", p) for i, p in enumerate(prompts(args.streams))]
    in_process(core, jobs[:2], 4)  # warm-up

    proc, target = start_server(work / "server", args.streams, work / "adapters")
    try:
        asyncio.run(_register(target, names, paths))
        runs = {"in-process": [], "grpc": []}
        for _ in range(args.rounds):
            runs["in-process"].append(in_process(core, jobs, args.new_tokens))
            runs["grpc"].append(asyncio.run(through_grpc(target, jobs, args.new_tokens)))
    finally:
        proc.terminate()
        proc.wait(60)
        core.close()

    best = {k: max(v, key=lambda r: r["tok_s"]) for k, v in runs.items()}
    ratio = best["grpc"]["tok_s"] / best["in-process"]["tok_s"]
    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M')} — gRPC overhead, {args.streams} concurrent streams × {args.new_tokens} tokens (base + 4 LoRA r16)\n",
        f"`python bench/bench_grpc.py --streams {args.streams} --new-tokens {args.new_tokens} --rounds {args.rounds}` on "
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, default model, dtype auto\n",
        "| path | tok/s | TTFT p50 | TTFT p90 | TTFT p99 | per-token p50 | p90 | p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, r in best.items():
        lines.append(f"| {k} | {r['tok_s']:.0f} | {pct(r['ttft'], 50):.2f}s | {pct(r['ttft'], 90):.2f}s | {pct(r['ttft'], 99):.2f}s | "
                     f"{pct(r['tpot'], 50) * 1e3:.0f}ms | {pct(r['tpot'], 90) * 1e3:.0f}ms | {pct(r['tpot'], 99) * 1e3:.0f}ms |")
    lines.append(f"\ngRPC / in-process throughput: **{ratio:.2f}×**; all rounds: "
                 + ", ".join(f"{k} " + "/".join(f"{r['tok_s']:.0f}" for r in v) for k, v in runs.items()))
    lines += ["\n| target | measured | goal | met / NOT met |", "|---|---|---|---|",
              f"| gRPC / in-process throughput | {ratio:.2f}× | ≥ 0.9× | {'met' if ratio >= 0.9 else 'NOT met'} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    with args.out.open("a") as f:
        f.write(text)


async def _register(target: str, names: list[str], paths: list[Path]) -> None:
    async with AsyncClient(target) as c:
        for n, p in zip(names, paths):
            await c.register_adapter(n, str(p))


if __name__ == "__main__":
    main()
