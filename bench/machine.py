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

from hotswap.server.cpu_threads import COMPUTE_THREADS
from hotswap.server.engine.packed_linears import pack_weight, packed_linear


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
    return f"{name[1].strip() if name else platform.processor() or platform.machine()} ({ext}, {amx}), {COMPUTE_THREADS} threads"


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


@torch.inference_mode()
def model_order_pass(model: nn.Module, batch: int, dtype: torch.dtype, reps: int = 10, packed: bool = False) -> dict:
    """Seconds one pass over the model's own linear weights takes at `batch` tokens, each weight
    once and in the model's order: what a decode step's matmuls cost when the weights (hundreds of
    MB) come from memory rather than from the cache gemm_bound's repeated shape keeps them in; and
    the tokens/s that caps. packed: with each weight packed once for oneDNN, as the engine runs bf16
    on CPU (engine/packed_linears.py), instead of torch's F.linear."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    inputs = {m.in_features: torch.randn(batch, m.in_features, dtype=dtype) for m in linears}
    if packed:
        weights = [pack_weight(m.weight, batch) for m in linears]
        run = lambda: [packed_linear(inputs[m.in_features], w, None) for m, w in zip(linears, weights)]  # noqa: E731
    else:
        run = lambda: [torch.nn.functional.linear(inputs[m.in_features], m.weight) for m in linears]  # noqa: E731
    seconds = _time(run, reps)
    return {"seconds": seconds, "tok_s": batch / seconds}
