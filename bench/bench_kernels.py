"""Micro-benchmark of the native CPU kernels (hotswap.server.engine.kernels)
against their torch reference and the naive baselines they replace.

    python bench/bench_kernels.py                 # torch's default thread count
    python bench/bench_kernels.py --threads 1

Decode-shaped calls rotate over enough copies of the KV cache / adapter slots
to exceed the L3 cache, as one step over 30 layers does, so the numbers are
memory-bound like the real thing. Every timing is the best of several rounds
(other processes share this machine). Appends a section to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from hotswap.server.engine import kernels
from hotswap.server.engine.kernels import reference

DT = torch.bfloat16
COLD_BYTES = 96 << 20  # rotate over this much data: well past a 32 MB L3


def samples_ms(fn, min_time: float, sample_seconds: float = 0.002) -> list[float]:
    """Sorted ms-per-call of samples of ~sample_seconds (at least one call) over min_time seconds."""
    fn()
    start = time.perf_counter()
    fn()
    per_sample = max(1, int(sample_seconds / max(time.perf_counter() - start, 1e-7)))
    out, end = [], time.perf_counter() + min_time
    while time.perf_counter() < end or len(out) < 5:
        start = time.perf_counter()
        for _ in range(per_sample):
            fn()
        out.append((time.perf_counter() - start) / per_sample * 1e3)
    return sorted(out)


def timeit(fn, min_time: float) -> float:
    """ms per call: the best ~2 ms sample. Other processes share this machine and
    an OpenMP region that waits for a descheduled thread costs milliseconds, so
    the best sample is the uncontended speed."""
    return samples_ms(fn, min_time)[0]


def copies_for(nbytes: int) -> int:
    return max(2, min(30, math.ceil(COLD_BYTES / max(1, nbytes))))


def machine() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16"]
    return {"model": model, "flags": " ".join(f for f in wanted if f in flags) or "n/a", "cores": os.cpu_count()}


def memory_read_gbps(min_time: float) -> float:
    x = torch.ones(64 << 20)  # 256 MB
    ms = timeit(lambda: x.sum(), min_time)
    return x.numel() * 4 / ms / 1e6


# ---- attention -------------------------------------------------------------------

def paged_layers(rows, ctx, H, KVH, D, block_size=16, copies=None):
    per_row = math.ceil(ctx / block_size)
    num_blocks = rows * per_row + 8
    layer_bytes = 2 * num_blocks * block_size * KVH * D * 2
    n = copies or copies_for(layer_bytes)
    caches = [(torch.randn(num_blocks, block_size, KVH, D, dtype=DT), torch.randn(num_blocks, block_size, KVH, D, dtype=DT))
              for _ in range(n)]
    tables = torch.randperm(num_blocks)[: rows * per_row].view(rows, per_row).int().contiguous()
    return caches, tables


def sdpa_gather(out, query, kc, vc, tables, rows_of, positions, scale):
    """The baseline: each query row's K/V gathered into padded contiguous tensors,
    one SDPA call with a mask (causal with the chunk's offset)."""
    R, block_size = tables.shape[0], kc.shape[1]
    length = int(positions.max()) + 1
    nb = math.ceil(length / block_size)
    k = kc[tables[:, :nb].long()].flatten(1, 2)[:, :length]  # [R, L, KVH, D]
    v = vc[tables[:, :nb].long()].flatten(1, 2)[:, :length]
    per_row = torch.bincount(rows_of.long(), minlength=R)
    T = int(per_row.max())
    q = query.view(R, T, *query.shape[1:]).transpose(1, 2)  # tokens grouped by row: [R, H, T, D]
    mask = torch.arange(length)[None, None, :] <= positions.view(R, T, 1)  # [R, T, L]
    o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=scale,
                                       enable_gqa=True)
    out.copy_(o.transpose(1, 2).reshape(out.shape))


def decode_scaling(thread_counts, min_time):
    """SmolLM2 decode at ctx 100 by thread count: best and median samples (the
    median shows what contention from other processes costs)."""
    caches, tables = paged_layers(64, 100, 9, 3, 64)
    q = torch.randn(64, 9, 64, dtype=DT)
    out, rows_of = torch.empty_like(q), torch.arange(64, dtype=torch.int32)
    pos, i, before, result = torch.full((64,), 99, dtype=torch.int32), [0], torch.get_num_threads(), []

    def run():
        kc, vc = caches[i[0] % len(caches)]
        i[0] += 1
        kernels.paged_attention(out, q, kc, vc, tables, rows_of, pos, 0.125, backend="native")

    for n in thread_counts:
        torch.set_num_threads(n)
        got = samples_ms(run, min_time, sample_seconds=0)  # single calls: catch the moments both cores are free
        result.append([str(n), f"{got[0]:.3f}", f"{got[len(got) // 10]:.3f}", f"{got[len(got) // 2]:.3f}"])
    torch.set_num_threads(before)
    return result


def bench_decode(label, rows, ctx, H, KVH, D, min_time, softcap=0.0, sinks=False):
    """softcap / sinks (Gemma 2 / GPT-OSS): the native kernel against the torch reference, which such
    calls took before the kernel had them (SDPA has neither: no baseline column)."""
    caches, tables = paged_layers(rows, ctx, H, KVH, D)
    q = torch.randn(rows, H, D, dtype=DT)
    out = torch.empty_like(q)
    rows_of = torch.arange(rows, dtype=torch.int32)
    pos = torch.full((rows,), ctx - 1, dtype=torch.int32)
    scale, i = D**-0.5, [0]

    def call(fn):
        def run():
            kc, vc = caches[i[0] % len(caches)]
            i[0] += 1
            fn(out, q, kc, vc, tables, rows_of, pos, scale, *extra)
        return run

    extra = (0, softcap, torch.randn(H) if sinks else None) if softcap or sinks else ()
    native = timeit(call(lambda *a: kernels.paged_attention(*a, backend="native")), min_time)
    ref = timeit(call(reference.paged_attention), min_time / 2)
    kv_bytes = 2 * rows * ctx * KVH * D * 2
    if extra:
        return [label, f"{rows}×1 @ {ctx}", f"{native:.3f}", f"{kv_bytes / native / 1e6:.1f}", f"{ref:.2f}", "—",
                f"reference / native {ref / native:.0f}×"]
    base = timeit(call(sdpa_gather), min_time / 2)
    return [label, f"{rows}×1 @ {ctx}", f"{native:.3f}", f"{kv_bytes / native / 1e6:.1f}", f"{ref:.2f}", f"{base:.2f}",
            f"{base / native:.1f}×"]


def prefill_times(nq, ctx, H, KVH, D, min_time, with_reference=False):
    caches, tables = paged_layers(1, ctx, H, KVH, D, copies=1)
    kc, vc = caches[0]
    q = torch.randn(nq, H, D, dtype=DT)
    out = torch.empty_like(q)
    rows_of = torch.zeros(nq, dtype=torch.int32)
    pos = torch.arange(ctx - nq, ctx, dtype=torch.int32)
    args = (out, q, kc, vc, tables, rows_of, pos, D**-0.5)
    native = timeit(lambda: kernels.paged_attention(*args, backend="native"), min_time)
    base = timeit(lambda: sdpa_gather(*args), min_time)
    ref = timeit(lambda: reference.paged_attention(*args), min_time / 2) if with_reference else float("nan")
    return native, ref, base


# ---- LoRA ---------------------------------------------------------------------------

def lora_slots(S, R, IN, OUT, copies):
    return [(torch.randn(S, R, IN, dtype=DT) * 0.05, torch.randn(S, R, OUT, dtype=DT) * 0.05) for _ in range(copies)]


def bench_lora(label, slots, rank, IN, OUT, min_time, R=32):
    """One shrink + expand for tokens with the given slots; all adapters at `rank` in R-wide slots."""
    N, S = len(slots), max(slots) + 1
    weight_bytes = S * R * (IN + OUT) * 2
    banks = lora_slots(S, R, IN, OUT, copies_for(weight_bytes))
    token_slots = torch.tensor(slots, dtype=torch.int32)
    ranks = torch.full((S,), rank, dtype=torch.int32)
    x = torch.randn(N, IN, dtype=DT)
    y = torch.randn(N, OUT, dtype=DT)
    t = torch.empty(N, R)
    i = [0]

    def step(shrink, expand):
        def run():
            a, b = banks[i[0] % len(banks)]
            i[0] += 1
            shrink(t, x, a, token_slots, ranks)
            expand(y, t, b, token_slots, ranks)
        return run

    native = timeit(step(lambda *a: kernels.lora_shrink(*a, backend="native"),
                         lambda *a: kernels.lora_expand(*a, backend="native")), min_time)
    ref = timeit(step(reference.lora_shrink, reference.lora_expand), min_time / 2)
    # Baselines: per-token weight copies + bmm (the engine's slotted mode) when
    # slots differ; one pair of matmuls when every token shares one adapter.
    idx = token_slots.long()
    if len(set(slots)) == 1:
        def baseline():
            a, b = banks[i[0] % len(banks)]
            i[0] += 1
            y.add_((x @ a[0, :rank].T) @ b[0, :rank])
        base_name = "y += (x@A.T)@B.T"
    else:
        rows = [(a[idx, :rank].contiguous(), b[idx, :rank].contiguous()) for a, b in banks]

        def baseline():
            a, b = rows[i[0] % len(rows)]
            i[0] += 1
            y.add_(torch.bmm(torch.bmm(x[:, None], a.transpose(1, 2)), b)[:, 0])
        base_name = "bmm, per-token copies"
    base = timeit(baseline, min_time / 2)
    distinct = len(set(slots))
    read = distinct * rank * (IN + OUT) * 2  # each adapter's weights once
    flops = 2 * N * rank * (IN + OUT)
    return [label, f"{N} tok / {distinct} slots", f"r{rank} {IN}→{OUT}", f"{native:.3f}", f"{read / native / 1e6:.1f}",
            f"{flops / native / 1e6:.1f}", f"{ref:.3f}", f"{base:.3f} ({base_name})", f"{base / native:.1f}×"]


def bench_lora_step(min_time: float, layers: int = 30, rows: int = 64) -> list[str]:
    """A decode step's LoRA work on the default model: every linear of `layers` layers, `rows`
    tokens each in its own slot, 64 all-linear adapters at ranks 8 / 16 / 32 (bench_engine.py's
    heaviest set): one shrink + expand per linear, ~0.7 GB of adapter weights read per step."""
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)] * layers
    S, R = 64, 32
    ranks = torch.tensor([(8, 16, 32)[i % 3] for i in range(S)], dtype=torch.int32)
    token_slots = torch.randperm(S)[:rows].to(torch.int32)
    weights = [(torch.randn(S, R, i, dtype=DT) * 0.05, torch.randn(S, R, o, dtype=DT) * 0.05) for i, o in shapes]
    xs = {i: torch.randn(rows, i, dtype=DT) for i in (576, 1536)}
    ys = {o: torch.randn(rows, o, dtype=DT) for o in (192, 576, 1536)}
    t = torch.empty(rows, R)

    def step():
        for (a, b), (i, o) in zip(weights, shapes):
            kernels.lora_shrink(t, xs[i], a, token_slots, ranks, backend="native")
            kernels.lora_expand(ys[o], t, b, token_slots, ranks, backend="native")
    ms = timeit(step, min_time)
    read = sum(int(ranks[s]) * (i + o) * 2 for s in token_slots.tolist() for i, o in shapes)
    return [f"{layers} layers × 7 linears", f"{rows} tok / {rows} slots", "r8/16/32", f"{ms:.1f}", f"{read / ms / 1e6:.1f}",
            f"{read / 1e6:.0f} MB"]


# ---- report -------------------------------------------------------------------------

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per native measurement")
    p.add_argument("--scaling-threads", type=int, default=os.cpu_count(), help="thread count for the scaling table")
    p.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    p.add_argument("--no-append", action="store_true", help="print only")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    if not kernels.native_available():
        sys.exit(f"native kernels unavailable: {kernels.native_unavailable_reason()}")
    info, load_start, build = machine(), os.getloadavg(), kernels.native.build_info()
    mt = args.min_time
    bandwidth = memory_read_gbps(mt)

    decode = [bench_decode("SmolLM2-135M (H9/KVH3/D64)", 64, ctx, 9, 3, 64, mt) for ctx in (100, 300, 1000)]
    decode.append(bench_decode("Llama-8B-like (H32/KVH8/D128)", 64, 100, 32, 8, 128, mt))
    decode.append(bench_decode("Llama-8B-like (H32/KVH8/D128)", 16, 1000, 32, 8, 128, mt))
    decode.append(bench_decode("Gemma-2-2B-like (H8/KVH4/D256), softcap 50", 32, 512, 8, 4, 256, mt, softcap=50.0))
    decode.append(bench_decode("GPT-OSS-20B-like (H64/KVH8/D64), sinks", 16, 512, 64, 8, 64, mt, sinks=True))
    scaling = decode_scaling(sorted({1, args.scaling_threads}), 2 * mt)

    prefill, scan = [], []
    for nq in (256, 512):
        for ctx in (500, 1000, 2000, 4000):
            if nq > ctx:
                continue
            n, r, b = prefill_times(nq, ctx, 9, 3, 64, mt / 2, with_reference=True)
            prefill.append([f"1×{nq} @ {ctx}", f"{n:.2f}", f"{r:.2f}", f"{b:.2f}", f"{b / n:.2f}×"])
    crossover = {}
    for ctx in (1000, 4000):
        for nq in (1, 4, 16, 64, 128, 256, 512):
            n, _, b = prefill_times(nq, ctx, 9, 3, 64, mt / 4)
            scan.append([str(ctx), str(nq), f"{n:.3f}", f"{b:.3f}", f"{b / n:.2f}×"])
            if b < n and ctx not in crossover:
                crossover[ctx] = nq

    lora = []
    for IN, OUT in ((576, 576), (576, 1536), (1536, 576)):
        for rank in (8, 16, 32):
            lora.append(bench_lora("decode", list(torch.randperm(64).tolist()), rank, IN, OUT, mt / 2))
    for IN, OUT in ((576, 576), (576, 1536), (1536, 576)):
        lora.append(bench_lora("prefill", [0] * 512, 16, IN, OUT, mt / 2))
    mixed = [1] * 128 + [2] * 128 + [3] * 128 + list(range(4, 68))
    lora.append(bench_lora("mixed", mixed, 16, 576, 1536, mt / 2))
    lora_step = bench_lora_step(2 * mt)

    load_end = os.getloadavg()
    command = "python bench/bench_kernels.py" + " ".join([""] + sys.argv[1:])
    smol100 = float(decode[0][2])
    best_prefill = min(float(r[4][:-1]) for r in prefill)
    threshold = ", ".join(f"ctx {c}: SDPA faster from {n} query tokens" for c, n in crossover.items()) or \
        "SDPA was never faster in the scanned range (1–512 query tokens per row, ctx 1000 and 4000)"
    decode_lora = [r for r in lora if r[0] == "decode"]
    lora_gbps = [float(r[4]) for r in decode_lora]
    prefill_lora = [float(r[8][:-1]) for r in lora if r[0] == "prefill"]
    section = f"""
## {datetime.now():%Y-%m-%d %H:%M} — native CPU kernels: paged attention, batched LoRA (bf16)

`{command}` on {info['model']} ({info['cores']} cores; {info['flags']}), torch {torch.__version__}, \
{torch.get_num_threads()} threads; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end \
(other processes share this machine: each timing is the best ~2 ms sample over the run); memory read bandwidth \
{bandwidth:.1f} GB/s (sum of a 256 MB tensor). Build: {build['build_dir']} (parallel: {build['parallel']}).

Decode attention, one call = one layer; KV caches rotate over enough copies to miss L3 (block size 16, \
random block tables). Baseline: gather each row's K/V into padded tensors + masked SDPA.

{table(["shape", "rows × q @ ctx", "native ms", "K/V GB/s", "reference ms", "gather+SDPA ms", "speed-up"], decode)}

Thread scaling, SmolLM2 decode at ctx 100 (same cold setup), ms per call, single-call samples:

{table(["threads", "best", "p10", "median"], scaling)}

Prefill-shaped attention (SmolLM2 shape, one row, the chunk is the last q positions of ctx):

{table(["q @ ctx", "native ms", "reference ms", "gather+SDPA ms", "SDPA / native"], prefill)}

Threshold scan (SmolLM2 shape): native vs gather + SDPA for one row's chunk.

{table(["ctx", "query tokens", "native ms", "gather+SDPA ms", "SDPA / native"], scan)}

LoRA shrink + expand (one call each; R = 32-wide slots, adapters at the given rank; slot weights rotate \
over copies past L3). "weights GB/s" counts each distinct adapter's rank-truncated weights once (A and B are \
both [S, R, features], so that is what memory serves).

{table(["case", "tokens", "shape", "native ms", "weights GB/s", "GFLOP/s", "reference ms", "baseline ms", "speed-up"], lora)}

A whole decode step's LoRA work (every linear of the default model once, its 64 rows each with its own \
all-linear adapter; the weights read are far past L3, as in bench_engine.py's 64-adapter run):

{table(["calls", "tokens", "ranks", "native ms", "weights GB/s", "read"], [lora_step])}

Conclusion: decode attention at ctx 100 (SmolLM2) takes {smol100:.3f} ms per layer call \
({float(decode[0][6][:-1]):.0f}× the gather + SDPA baseline; target ≤ 0.25 ms). Prefill chunks: native is \
{best_prefill:.2f}× SDPA at worst in the table; {threshold}. Decode LoRA reads adapter weights at \
{min(lora_gbps):.0f}–{max(lora_gbps):.0f} GB/s of useful bytes per call, {lora_step[4]} GB/s over a whole step \
(memory read bandwidth {bandwidth:.0f} GB/s); a 512-token \
single-adapter run is {min(prefill_lora):.2f}–{max(prefill_lora):.2f}× the speed of torch's two matmuls. \
Bench time {time.perf_counter() - started:.0f} s.
"""
    print(section)
    if not args.no_append:
        with open(args.out, "a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
