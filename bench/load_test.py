"""A bounded load test: many concurrent gRPC streams against a real hotswap-server
process for a fixed time, with a mix of adapters (base, LoRA, prompt tuning, prefix
tuning) and clients that cancel at random. It checks what ops care about under
load, not speed: no request that was not cancelled is lost or cut short, the
running/waiting gauges and the KV cache return to 0 when the load stops, and the
server's memory stays flat.

    python bench/load_test.py                           # 200 streams x 10 minutes, default model
    python bench/load_test.py --streams 50 --minutes 2  # a shorter run

Every request asks for a random 8-48 tokens with ignore_eos, so a completed one
must carry exactly that many. About 1 in 6 clients leaves its stream after a few
chunks (a cancel). Appends a section with a Targets table to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import re
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hotswap.client import AsyncClient

from adapters import adapter_set
from machine import cpu_name
from launch import start_server as start_process

HERE = Path(__file__).resolve().parent
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
KV_CACHE_MB = 512
RSS_FLAT_MIB = 64
"""How far RSS may move and still count as flat (allocator noise; a leak of one row's
state per request would be far past it). Judged twice: the idle RSS after the load
against the RSS after its first minute (what the load left behind), and the trend over
the run's second half (mean of its last half against mean of its first half). Single
samples swing by ±100 MiB with the batch's transient tensors, so a peak is not judged.
The first minutes are warm-up: on CPU, oneDNN's primitive cache and ideep's LRU cache
keep a compiled kernel per matmul shape (bounded: engine/host_memory.py)."""


@dataclass
class Tally:
    completed: int = 0
    cancelled: int = 0
    short: int = 0
    """Finished without error but with fewer tokens than asked: a lost request."""
    errors: dict[str, int] = field(default_factory=dict)
    tokens: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1]) / 1024


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(hotswap_[a-z_]+) (\S+)$", text, re.M)}


def start_server(data: Path, adapters_dir: Path, metrics_port: int) -> tuple[subprocess.Popen, str]:
    return start_process("--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--data-dir", str(data), "--tuner-workers", "0",
                         "--allowed-adapter-dir", str(adapters_dir),
                         # a pool the load fills (and preempts in) within the first minute: after that, memory must stay flat
                         "--kv-cache-mb", str(KV_CACHE_MB))


async def client_loop(c: AsyncClient, names: list[str], deadline: float, rng: random.Random, tally: Tally) -> None:
    while time.monotonic() < deadline:
        adapter = rng.choice(names)
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))
        want = rng.randint(8, 48)
        cancel_after = rng.randint(1, 4) if rng.random() < 1 / 6 else None
        got, chunks = 0, 0
        try:
            async for ch in c.stream(prompt, adapter=adapter, max_new_tokens=want, ignore_eos=True, temperature=0.8, timeout=600):
                got += len(ch.token_ids)
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    break  # leaving the stream cancels the request
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported by its type
            name = getattr(e, "code", type(e).__name__)
            tally.errors[str(name)] = tally.errors.get(str(name), 0) + 1
            continue
        tally.tokens += got
        if cancel_after is not None and chunks >= cancel_after:
            tally.cancelled += 1
        elif got == want:
            tally.completed += 1
        else:
            tally.short += 1


async def drive(target: str, names: list[str], streams: int, seconds: float, pid: int, seed: int) -> tuple[Tally, list[tuple[float, float]]]:
    tally, samples = Tally(), []
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()

    async def sample_memory() -> None:
        while time.monotonic() < deadline:
            samples.append((time.monotonic() - t0, rss_mib(pid)))
            await asyncio.sleep(15)

    clients = [AsyncClient(target) for _ in range(max(1, streams // 25))]  # several HTTP/2 connections, as many clients would
    try:
        await asyncio.gather(sample_memory(), *[client_loop(clients[i % len(clients)], names, deadline, random.Random(seed + i), tally)
                                                for i in range(streams)])
    finally:
        for c in clients:
            await c.close()
    return tally, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hotswap-load-"))
    from transformers import AutoModelForCausalLM

    from hotswap.server.config import ModelConfig
    from hotswap.server.model.loader import load_base_model

    checkpoint = load_base_model(ModelConfig(dtype="float32", device="cpu")).checkpoint_dir
    base = lambda: AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)  # noqa: E731
    paths = {**{f"lora{i}": p for i, p in enumerate(adapter_set(base, work / "adapters", "lora", 4, [8, 16]))},
             **{f"prompt{i}": p for i, p in enumerate(adapter_set(base, work / "adapters", "prompt", 2, [8]))},
             **{f"prefix{i}": p for i, p in enumerate(adapter_set(base, work / "adapters", "prefix", 2, [8]))}}
    metrics_port = free_port()
    proc, target = start_server(work / "server", work / "adapters", metrics_port)
    try:
        async def register() -> None:
            async with AsyncClient(target) as c:
                for name, path in paths.items():
                    await c.register_adapter(name, str(path))
                await c.generate("warm up", max_new_tokens=2)

        asyncio.run(register())
        names = ["", *paths]  # "" = the base model
        started = time.monotonic()
        tally, samples = asyncio.run(drive(target, names, args.streams, args.minutes * 60, proc.pid, args.seed))
        wall = time.monotonic() - started
        time.sleep(3)  # the last cancels reach the engine at its next step
        after = scrape(metrics_port)
        rss_end = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(120)

    minute1 = samples[min(len(samples) - 1, 4)][1] if samples else float("nan")  # after ~1 minute of load
    half = [r for t, r in samples if t >= args.minutes * 30] or [float("nan")]
    early, late = half[: len(half) // 2] or half, half[len(half) // 2:]
    trend = sum(late) / len(late) - sum(early) / len(early)
    left = rss_end - minute1
    lost = tally.short + sum(tally.errors.values())
    gauges = {k: after.get(k, -1) for k in ("hotswap_requests_running", "hotswap_requests_waiting", "hotswap_kv_cache_used_blocks")}
    rows = [
        ("requests not cancelled that were lost or cut short", f"{lost} (errors {tally.errors or 'none'}, short {tally.short})", "0", lost == 0),
        ("running / waiting gauges, KV blocks used at the end", " / ".join(f"{v:g}" for v in gauges.values()), "0 / 0 / 0",
         all(v == 0 for v in gauges.values())),
        ("server RSS idle after the load − after its first minute", f"{left:+.0f} MiB ({minute1:.0f} → {rss_end:.0f} MiB)",
         f"≤ {RSS_FLAT_MIB} MiB", left <= RSS_FLAT_MIB),
        ("server RSS trend over the second half (mean of its last half − its first half)",
         f"{trend:+.0f} MiB ({sum(early) / len(early):.0f} → {sum(late) / len(late):.0f} MiB)", f"≤ {RSS_FLAT_MIB} MiB", trend <= RSS_FLAT_MIB),
    ]
    text = (
        f"\n## Load test — {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`python bench/load_test.py --streams {args.streams} --minutes {args.minutes:g}` — {cpu_name()}, torch {torch.__version__}, "
        f"default model, dtype auto, --kv-cache-mb {KV_CACHE_MB}; {args.streams} concurrent streams over {max(1, args.streams // 25)} connections, "
        f"adapters: base, 4 LoRA (all-linear r8/r16), 2 prompt tuning, 2 prefix tuning; 1 in 6 clients cancels after 1-4 chunks.\n\n"
        f"- {wall:.0f} s of load: {tally.completed} requests completed with every token asked for, {tally.cancelled} cancelled by "
        f"their clients, {tally.tokens} tokens streamed ({tally.tokens / wall:.0f} tok/s)\n"
        f"- server RSS samples (s, MiB): " + ", ".join(f"{t:.0f}:{r:.0f}" for t, r in samples)
        + f"; at the end, idle: {rss_end:.0f}\n"
        f"- RSS range over the second half: {min(half):.0f}–{max(half):.0f} MiB\n\n"
        "| Target | Measured | Goal | |\n|---|---|---|---|\n"
        + "".join(f"| {name} | {got} | {goal} | {'met' if ok else 'NOT met'} |\n" for name, got, goal, ok in rows)
    )
    print(text)
    with args.out.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
