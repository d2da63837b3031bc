"""glibc's malloc thresholds and the CPU engine's prefill: each 2,048-token prompt's time
to first token in a fresh server process, with glibc's defaults vs the thresholds the
engine fixes on CPU (engine/host_memory.py: reuse_freed_memory), alternating processes
so drift on a shared machine hits both; plus a decode phase and resident memory.

    python bench/allocator.py [--rounds 2] [--prompts 6]

Appends a section to bench/RESULTS.md."""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def child(prompts: int, tokens: int) -> dict:
    import torch

    from hotswap.server.config import EngineConfig, ModelConfig
    from hotswap.server.cpu_threads import serial
    from hotswap.server.engine.request import GenerateRequest, SamplingParams
    from hotswap.server.serving import ServingCore

    serial()
    torch.manual_seed(0)
    rnd = random.Random(0)
    ids = lambda n: [rnd.randrange(100, 40000) for _ in range(n)]  # noqa: E731
    cfg = EngineConfig(max_batch_size=64, max_tokens_per_step=tokens, kv_cache_bytes=2**30, enable_prefix_caching=False)
    with ServingCore.from_config(ModelConfig(quantization="none"), cfg) as core:
        core.generate(GenerateRequest(prompt_ids=ids(32), params=SamplingParams(max_new_tokens=2)), 600)
        ttft = []
        for _ in range(prompts):
            r = core.generate(GenerateRequest(prompt_ids=ids(tokens), params=SamplingParams(max_new_tokens=1)), 600)
            ttft.append(r.time_to_first_token)
        params = SamplingParams(max_new_tokens=64, ignore_eos=True)
        t = time.monotonic()
        streams = [core.submit(GenerateRequest(prompt_ids=ids(24), params=params)) for _ in range(64)]
        for s in streams:
            s.result(600)
        decode = 64 * 64 / (time.monotonic() - t)
        time.sleep(0.5)  # the loop trims once the batch is empty
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"ttft": ttft, "decode_tok_s": decode, "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
            "peak_mib": int(status["VmHWM"].split()[0]) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.prompts, args.tokens)))
        return
    from machine import cpu_name

    # GLIBC_TUNABLES set (to a no-op) tells the engine the operator chose malloc's settings: glibc's defaults stay
    modes = {"glibc defaults": {"GLIBC_TUNABLES": "glibc.malloc.check=0"}, "thresholds fixed (engine default)": {}}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode, extra in modes.items():
            env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
            out = subprocess.run([sys.executable, __file__, "--child", "--prompts", str(args.prompts), "--tokens", str(args.tokens)],
                                 env={**env, **extra}, capture_output=True, text=True, check=True, cwd=HERE)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(mode, runs[mode][-1], flush=True)
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — malloc thresholds and CPU prefill",
             f"\n`python bench/allocator.py --rounds {args.rounds} --prompts {args.prompts} --tokens {args.tokens}` on {cpu_name()}; "
             f"each process: warm-up, {args.prompts} prompts of {args.tokens} tokens one at a time, then 64 rows × 64 new tokens.\n",
             "| malloc | first 2 prompts TTFT (median) | later prompts TTFT median (min) | decode tok/s | RSS after / peak MiB |",
             "|---|---|---|---|---|"]
    for mode, rs in runs.items():
        first = [t for r in rs for t in r["ttft"][:2]]
        later = [t for r in rs for t in r["ttft"][2:]]
        lines.append(f"| {mode} | {statistics.median(first):.2f} s | {statistics.median(later):.2f} s ({min(later):.2f} s) | "
                     f"{statistics.median([r['decode_tok_s'] for r in rs]):.0f} | "
                     f"{statistics.median([r['rss_mib'] for r in rs]):.0f} / {statistics.median([r['peak_mib'] for r in rs]):.0f} |")
    print("\n".join(lines))
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
