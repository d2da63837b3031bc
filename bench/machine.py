"""What the machine can do, measured in the bench process: the CPU's name and vector
extensions, and the GEMM bound of a decode step — the time the model's own linear
layers (and output head) take at a given batch, which no engine can beat."""
from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import torch
from torch import nn


def cpu_name() -> str:
    """e.g. "AMD EPYC (avx512_bf16, amx: no), 2 threads"."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    name = re.search(r"model name\s*:\s*(.+)", info)
    flags = set(re.search(r"flags\s*:\s*(.+)", info)[1].split()) if "flags" in info else set()
    ext = "avx512_bf16" if "avx512_bf16" in flags else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    amx = "amx" if "amx_bf16" in flags else "no amx"
    return f"{name[1].strip() if name else platform.processor() or platform.machine()} ({ext}, {amx}), {torch.get_num_threads()} threads"


def _time(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


@torch.inference_mode()
def gemm_bound(model: nn.Module, batch: int, dtype: torch.dtype, reps: int = 20) -> dict:
    """Seconds the model's linears take for `batch` tokens (each distinct shape timed once and
    counted as often as it occurs), FLOPs per token, and the bound in tokens/s."""
    shapes: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            shapes[(m.in_features, m.out_features)] = shapes.get((m.in_features, m.out_features), 0) + 1
    head = model.get_output_embeddings()
    if head is not None and not isinstance(head, nn.Linear):
        shapes[(head.weight.shape[1], head.weight.shape[0])] = 1
    seconds = flops = 0.0
    for (fan_in, fan_out), count in shapes.items():
        x = torch.randn(batch, fan_in, dtype=dtype)
        w = torch.randn(fan_out, fan_in, dtype=dtype)
        seconds += count * _time(lambda: torch.nn.functional.linear(x, w), reps)
        flops += count * 2 * fan_in * fan_out
    return {"seconds": seconds, "flops_per_token": flops, "tok_s": batch / seconds, "gflops": flops * batch / seconds / 1e9}
