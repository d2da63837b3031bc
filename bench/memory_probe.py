"""In-process memory probe for the load test's memory row: every 50 requests, the
process RSS split into the paged KV pool (its mappings in /proc/self/smaps) and the
rest, the number of live tensors and the Python object types that grew.

    python bench/memory_probe.py [requests=400] [concurrency=48]

Default model, base only, temperature 0.8, 1 in 6 requests cancelled after its
first event, --kv-cache-mb 512."""
from __future__ import annotations

import collections
import gc
import random
import re
import sys
import time

import torch

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.serving import ServingCore

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def smaps_rss(ranges: list[tuple[int, int]]) -> tuple[float, float]:
    """(RSS of the mappings overlapping `ranges`, total RSS), MiB."""
    total = hit = 0
    current = (0, 0)
    for line in open("/proc/self/smaps"):
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            current = (int(m[1], 16), int(m[2], 16))
        elif line.startswith("Rss:"):
            kb = int(line.split()[1])
            total += kb
            if any(current[0] < end and start < current[1] for start, end in ranges):
                hit += kb
    return hit / 1024, total / 1024


def main(n_total: int, concurrency: int) -> None:
    core = ServingCore.from_config(ModelConfig(), EngineConfig(kv_cache_bytes=512 << 20))
    kv = core.engine.runner.cache
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (kv.keys, kv.values)]
    print("dtype", kv.keys.dtype, "blocks", core.engine.kv.num_blocks, flush=True)
    rng = random.Random(0)
    live: list = []
    done, t0, first = 0, time.time(), None
    while done < n_total:
        while len(live) < concurrency:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))
            params = SamplingParams(max_new_tokens=rng.randint(8, 48), ignore_eos=True, temperature=0.8)
            live.append((core.submit(GenerateRequest(prompt=prompt, params=params)), rng.random() < 1 / 6))
        stream, cancel = live.pop(0)
        if cancel:
            next(iter(stream))
            core.cancel(stream)
        stream.result(600)
        done += 1
        if done % 50 == 0:
            gc.collect()
            kv_rss, total = smaps_rss(ranges)
            types = collections.Counter(type(o).__name__ for o in gc.get_objects())
            first = first or types
            grew = {k: v - first.get(k, 0) for k, v in types.items() if abs(v - first.get(k, 0)) > 20}
            tensors = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
            sched = core.engine.scheduler
            print(f"{done:5d} t={time.time() - t0:5.0f}s rss={total:7.0f} kv_rss={kv_rss:6.0f} other={total - kv_rss:7.0f} MiB "
                  f"tensors={tensors} waiting={len(sched.waiting)} running={len(sched.running)} "
                  f"cached={len(core.engine.kv.pool.cached)} grew={grew}", flush=True)
    core.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 400, int(sys.argv[2]) if len(sys.argv) > 2 else 48)
