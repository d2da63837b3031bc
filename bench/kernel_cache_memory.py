"""How much host memory CPU bf16 matmuls keep per shape, and what capping their caches costs.

oneDNN (primitive cache, ONEDNN_PRIMITIVE_CACHE_CAPACITY) and ideep (LRU cache,
LRU_CACHE_CAPACITY) keep one compiled kernel per matmul shape; both read their
capacity at the first matmul, so each setting runs in its own process.

    .venv/bin/python bench/kernel_cache_memory.py

Two workloads, default model widths (hidden 576, MLP 1536), bf16:
- repeat: 300 distinct row counts through two linears, three passes — RSS growth after
  each pass (a per-shape cache grows on the first pass only);
- server mix: 3,000 steps, 80% with 1-64 rows (decode), 20% with 65-2048 (prefill),
  through four linears — RSS growth and seconds."""
from __future__ import annotations

import ctypes
import os
import random
import re
import subprocess
import sys
import time

SETTINGS = [None, 1, 128, 256, 512]
"""Entries per cache; None: the libraries' defaults. Not 0: torch 2.13 crashes (SIGSEGV)
with LRU_CACHE_CAPACITY=0."""


def rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read())[1]) / 1024


def run(workload: str) -> None:
    import torch

    trim = ctypes.CDLL("libc.so.6").malloc_trim  # freed memory back first: what remains is held
    dt = torch.bfloat16
    torch.manual_seed(0)
    hidden, mlp = 576, 1536
    rng = random.Random(0)
    start = rss_mib()
    if workload == "repeat":
        weights = [torch.randn(hidden, hidden, dtype=dt), torch.randn(mlp, hidden, dtype=dt)]
        rows = rng.sample(range(1, 1500), 300)
        growth = []
        for _ in range(3):
            for m in rows:
                x = torch.randn(m, hidden, dtype=dt)
                for w in weights:
                    torch.nn.functional.linear(x, w)
            trim(0)
            growth.append(rss_mib() - start)
        print(" / ".join(f"{g:.0f}" for g in growth) + " MiB after passes 1 / 2 / 3")
    else:
        ins = [torch.randn(hidden, hidden, dtype=dt), torch.randn(192, hidden, dtype=dt), torch.randn(mlp, hidden, dtype=dt)]
        down = torch.randn(hidden, mlp, dtype=dt)
        t0 = time.perf_counter()
        for _ in range(3000):
            m = rng.randint(1, 64) if rng.random() < 0.8 else rng.randint(65, 2048)
            x = torch.randn(m, hidden, dtype=dt)
            for w in ins:
                y = torch.nn.functional.linear(x, w)
            torch.nn.functional.linear(y, down)
        seconds = time.perf_counter() - t0
        trim(0)
        print(f"{rss_mib() - start:.0f} MiB, {seconds:.1f} s")


def main() -> None:
    for workload in ("repeat", "server mix"):
        print(f"## {workload}")
        for entries in SETTINGS:
            env = dict(os.environ)
            for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
                env.pop(name, None)
                if entries is not None:
                    env[name] = str(entries)
            out = subprocess.run([sys.executable, __file__, "--run", workload], env=env, capture_output=True, text=True, check=True)
            print(f"{'default (1024)' if entries is None else entries:>15} entries: {out.stdout.strip()}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--run":
        run(sys.argv[2])
    else:
        main()
