"""What a second OpenMP pool costs (server/hotswap/server/cpu_threads.py).

libgomp keeps a worker pool for each thread that ran a parallel region, until that
thread exits; once the pools hold more threads than there are cores, no worker spins
between regions. This times one decode-sized bf16 matmul ([64, 576] x [576, 1536],
the default model's MLP up-projection at 64 rows) on a thread that computes:

  alone          the only thread that ever ran a parallel region
  second pool    another long-lived thread (here: the main one) already holds a pool
  after passing  that other pool belonged to a thread that has ended (what the server does)

Each case runs in a fresh process.

    python bench/openmp_pools.py
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import torch

CASES = ("alone", "second pool", "after passing")


def _matmul_us(reps: int = 3000) -> float:
    x = torch.randn(64, 576).to(torch.bfloat16)
    w = torch.randn(1536, 576).to(torch.bfloat16)
    for _ in range(50):
        torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps // 5):
            torch.nn.functional.linear(x, w)
        best = min(best, (time.perf_counter() - t) / (reps // 5))
    return best * 1e6


def _case(name: str) -> float:
    """Runs in the child process: prepares the other pool, then times on a worker thread."""
    warm = torch.randn(256, 256)
    if name == "second pool":
        warm @ warm  # the main thread (long-lived) now holds a pool
    elif name == "after passing":
        t = threading.Thread(target=lambda: warm @ warm)
        t.start()
        t.join()
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("us", _matmul_us()))
    worker.start()
    worker.join()
    return out["us"]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--case":
        print(_case(sys.argv[2]))
        return
    from machine import cpu_name

    print(f"`python bench/openmp_pools.py` on {cpu_name()}, torch {torch.__version__}\n")
    print("| case | bf16 matmul [64,576]x[576,1536], µs (best of 5) |\n|---|---|")
    for name in CASES:
        us = float(subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True, check=True).stdout.split()[-1])
        print(f"| {name} | {us:.0f} |")


if __name__ == "__main__":
    main()
