"""Long prompts on the paged engine, on the default model: prefix caching, chunked
prefill and the KV memory bound, each against its named baseline in one process.

- prefix caching: 64 requests sharing one 1,000-token system prompt over 8 adapters
  (LoRA, prompt and prefix tuning), time to first token with the prefix cache on vs off;
- chunked prefill: 32 rows decoding while 4,000-token prompts arrive, the decoding
  rows' inter-token latency against their steady state (no long prompt arriving);
- one 4,000-token prefill (time to first token) against transformers' forward on the
  same prompt;
- memory: the process's resident memory after 4,000-token requests, against the
  weights plus the configured KV budget: once the engine has idled 1 s (the level the
  process stays at: the engine thread gives back what its steps freed when its batch
  empties, while the caller already holds its answer), and at the moment the last
  answer arrives (reported beside it).

    python bench/bench_long.py

Appends a section with a Targets table to bench/RESULTS.md."""
from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hotswap.server.config import AdapterCacheConfig, EngineConfig, ModelConfig
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.cpu_threads import in_passing_thread, serial
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore

from adapters import adapter_set
from machine import cpu_name

HERE = Path(__file__).parent


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def random_ids(n: int, seed: int, vocab: int = 40000) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(100, vocab) for _ in range(n)]


def submit_timed(core: ServingCore, req: GenerateRequest):
    """Submit with a notifier that stamps every event as the engine emits it."""
    stamps: list[float] = []
    stream = core.submit(req, lambda e: stamps.append(time.monotonic()) if e.token_ids else None)
    return stream, stamps


def prefix_caching(loaded, ids: list[str], args) -> dict:
    system = random_ids(args.system_tokens, seed=1)
    jobs = [(ids[i % len(ids)], system + random_ids(16, seed=100 + i)) for i in range(args.requests)]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    out = {}
    for caching in (False, True):
        cfg = EngineConfig(max_batch_size=64, max_tokens_per_step=args.max_tokens_per_step, max_decode_slowdown=args.max_decode_slowdown, enable_prefix_caching=caching,
                           kv_cache_bytes=args.kv_cache_mb * 2**20)
        with ServingCore(loaded, cfg, AdapterCacheConfig(device_bytes=2**30)) as core:
            for name, path in args.adapter_paths:
                core.register_adapter(name, path)
                core.adapters.load(core.resolve(name))
            core.generate(GenerateRequest(prompt_ids=random_ids(32, 0), params=SamplingParams(max_new_tokens=2)), 600)  # warm-up
            t0 = time.monotonic()
            streams = [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=params)) for a, p in jobs]
            results = [s.result(3600) for s in streams]
            assert not [r.error for r in results if r.error]
            ttft = [r.time_to_first_token for r in results]
            out[caching] = {"ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "wall": time.monotonic() - t0,
                            "hit_rate": core.loop.snapshot.prefix_cache_hits / max(1, core.loop.snapshot.prefix_cache_queries)}
    return out


def chunked_prefill(loaded, args) -> dict:
    cfg = EngineConfig(max_batch_size=64, max_tokens_per_step=args.max_tokens_per_step, max_decode_slowdown=args.max_decode_slowdown, kv_cache_bytes=args.kv_cache_mb * 2**20)
    gaps = {}
    with ServingCore(loaded, cfg) as core:
        core.generate(GenerateRequest(prompt_ids=random_ids(32, 0), params=SamplingParams(max_new_tokens=2)), 600)
        for phase in ("steady", "long prompts arriving"):
            n_new = args.decode_tokens
            rows = [submit_timed(core, GenerateRequest(prompt_ids=random_ids(24, 200 + i), params=SamplingParams(max_new_tokens=n_new, ignore_eos=True)))
                    for i in range(args.decoding_rows)]
            while min(len(s) for _, s in rows) < 8:  # every row past its prefill: decoding
                time.sleep(0.01)
            t_start = time.monotonic()
            longs = []
            if phase != "steady":
                for j in range(args.long_prompts):
                    longs.append(core.submit(GenerateRequest(prompt_ids=random_ids(args.long_tokens, 300 + j),
                                                             params=SamplingParams(max_new_tokens=4, ignore_eos=True))))
                    time.sleep(args.long_gap)
            for s, _ in rows:
                s.result(3600)
            for s in longs:
                assert s.result(3600).error is None
            t_end = max(s.result(0).total_time + s.submitted_at for s in longs) if longs else time.monotonic()
            # inter-token gaps of the decoding rows while the window lasted
            gaps[phase] = [b - a for _, st in rows for a, b in zip(st, st[1:]) if t_start <= a and b <= t_end]
    return {phase: {"p50": pct(g, 50), "p99": pct(g, 99), "n": len(g)} for phase, g in gaps.items()}


def long_prefill(loaded, args) -> dict:
    # a fresh prompt each round and no prefix cache: every round computes all its positions
    prompts = [random_ids(args.long_tokens, seed=7 + i) for i in range(args.rounds)]
    cfg = EngineConfig(max_batch_size=64, max_tokens_per_step=args.max_tokens_per_step, max_decode_slowdown=args.max_decode_slowdown, kv_cache_bytes=args.kv_cache_mb * 2**20,
                       enable_prefix_caching=False)
    rss = {"before engine": rss_bytes()}
    with ServingCore(loaded, cfg) as core:
        budget = core.engine.runner.cache.nbytes
        rss["engine started"] = rss_bytes()
        core.generate(GenerateRequest(prompt_ids=random_ids(32, 0), params=SamplingParams(max_new_tokens=2)), 600)
        ours = []
        for prompt in prompts:
            r = core.generate(GenerateRequest(prompt_ids=prompt, params=SamplingParams(max_new_tokens=1)), 3600)
            ours.append(r.time_to_first_token)
        rss[f"after the {args.long_tokens}-token requests"] = rss_bytes()
        time.sleep(1.0)  # the batch emptied: the engine thread gives back what its steps freed
        rss["after the engine idled 1 s"] = rss_bytes()
        packed = core.engine.runner.packed_bytes
    return {"ours": min(ours), "theirs": min(in_passing_thread(transformers_prefill, loaded, prompts)), "rss": rss,
            "kv_budget": budget, "packed": packed}


@torch.inference_mode()
def transformers_prefill(loaded, prompts: list[list[int]]) -> list[float]:
    """Seconds of transformers' forward over each prompt (the baseline), on a thread of its own
    once the engine's is gone (cpu_threads.py: two pools would slow both)."""
    model = AutoModelForCausalLM.from_pretrained(loaded.checkpoint_dir, dtype=loaded.dtype).eval()
    model(input_ids=torch.tensor([prompts[0][:64]]), logits_to_keep=1)  # warm-up
    theirs = []
    for prompt in prompts:
        x = torch.tensor([prompt])
        t = time.monotonic()
        model(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=1)
        theirs.append(time.monotonic() - t)
    return theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", default="none", choices=["none", "nf4"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--decoding-rows", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=160)
    ap.add_argument("--long-prompts", type=int, default=2)
    ap.add_argument("--long-tokens", type=int, default=4000)
    ap.add_argument("--long-gap", type=float, default=1.0, help="seconds between long prompts")
    ap.add_argument("--max-tokens-per-step", type=int, default=0, help="0: the engine's default for the device")
    ap.add_argument("--kv-cache-mb", type=int, default=1024)
    ap.add_argument("--max-decode-slowdown", type=float, default=EngineConfig().max_decode_slowdown,
                    help="the engine's prompt pacing (0: off); the default is the engine's")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache/hotswap/bench")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    serial()  # this thread only submits; the engine's thread computes (cpu_threads.py)
    loaded = load_base_model(ModelConfig(quantization=args.quantization))
    if not args.max_tokens_per_step:
        args.max_tokens_per_step = EngineConfig().max_tokens_per_step
    ckpt = loaded.checkpoint_dir
    base = lambda: AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)  # noqa: E731
    sets = in_passing_thread(lambda: {"lora": adapter_set(base, args.workdir, "lora-attn", 4, [16]),
                                      "prompt": adapter_set(base, args.workdir, "prompt", 2, [8]),
                                      "prefix": adapter_set(base, args.workdir, "prefix", 2, [8])})
    args.adapter_paths = [(f"{kind}-{i}", p) for kind, paths in sets.items() for i, p in enumerate(paths)]
    ids = [name for name, _ in args.adapter_paths]

    cmd = (f"`python bench/bench_long.py --quantization {args.quantization} --requests {args.requests} --system-tokens {args.system_tokens} "
           f"--decoding-rows {args.decoding_rows} --long-prompts {args.long_prompts} --long-tokens {args.long_tokens} "
           f"--max-tokens-per-step {args.max_tokens_per_step} --kv-cache-mb {args.kv_cache_mb}"
           + (f" --max-decode-slowdown {args.max_decode_slowdown:g}" if args.max_decode_slowdown != EngineConfig().max_decode_slowdown else "")
           + "`")
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — long prompts: prefix caching, chunked prefill, KV memory ({args.quantization}, {loaded.dtype})",
             f"\n{cmd} on {cpu_name()}, torch {torch.__version__}\n"]

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    pc = prefix_caching(loaded, ids, args)
    ttft_gain = pc[False]["ttft_p50"] / pc[True]["ttft_p50"]
    log(f"Prefix caching, {args.requests} requests × ({args.system_tokens}-token system prompt + 16) over {len(ids)} adapters "
        f"(LoRA, prompt, prefix), {args.new_tokens} new tokens: TTFT p50 {pc[False]['ttft_p50']:.2f}s without caching, "
        f"{pc[True]['ttft_p50']:.2f}s with (p90 {pc[False]['ttft_p90']:.2f}s / {pc[True]['ttft_p90']:.2f}s); wall "
        f"{pc[False]['wall']:.1f}s / {pc[True]['wall']:.1f}s; prompt tokens found cached {pc[True]['hit_rate']:.0%}.")
    cp = chunked_prefill(loaded, args)
    steady, busy = cp["steady"], cp["long prompts arriving"]
    log(f"\nChunked prefill, {args.decoding_rows} rows decoding, {args.long_prompts} × {args.long_tokens}-token prompts arriving "
        f"(max_tokens_per_step {args.max_tokens_per_step}): inter-token latency steady p50 {steady['p50'] * 1e3:.0f}ms "
        f"p99 {steady['p99'] * 1e3:.0f}ms; while the long prompts prefill p50 {busy['p50'] * 1e3:.0f}ms p99 {busy['p99'] * 1e3:.0f}ms "
        f"({busy['n']} gaps).")
    lp = long_prefill(loaded, args)
    log(f"\nOne {args.long_tokens}-token prompt: hotswap time to first token {lp['ours']:.2f}s; transformers forward "
        f"(logits of the last position only) {lp['theirs']:.2f}s — {lp['ours'] / lp['theirs']:.2f}× its time.")
    rss = lp["rss"]
    # A packed copy of the bf16 weights this engine made (engine/packed_linears.py) is weights, not KV: counted
    # apart. (An earlier engine on the same model may have packed them already: then it is in "before engine".)
    grown = rss[f"after the {args.long_tokens}-token requests"] - rss["before engine"] - lp["packed"]
    idled = rss["after the engine idled 1 s"] - rss["before engine"] - lp["packed"]
    log("\nResident memory: " + "; ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in rss.items())
        + f". KV budget {lp['kv_budget'] / 2**20:.0f} MiB; the engine added {grown / 2**20:.0f} MiB besides "
        f"{lp['packed'] / 2**20:.0f} MiB of prepacked linear weights ({idled / 2**20:.0f} MiB once the engine idled 1 s: "
        f"{idled / lp['kv_budget']:.3f} of the budget).")
    itl_ratio = busy["p99"] / steady["p50"]
    log("\n| target | measured | goal | met / NOT met |\n|---|---|---|---|")
    rows = [
        ("prefix caching: TTFT p50 without / with", f"{ttft_gain:.1f}×", "≥ 5×", ttft_gain >= 5),
        ("chunked prefill: decoding rows' p99 inter-token latency / steady p50", f"{itl_ratio:.1f}×", "≤ 3×", itl_ratio <= 3),
        (f"{args.long_tokens}-token prefill time / transformers", f"{lp['ours'] / lp['theirs']:.2f}×", "≤ 1.0×", lp["ours"] <= lp["theirs"]),
        (f"memory added by the engine after {args.long_tokens}-token requests, once it idled 1 s / KV budget",
         f"{idled / lp['kv_budget']:.3f}", "≤ 1 (within the budget)", idled <= lp["kv_budget"]),
    ]
    for target, measured, goal, ok in rows:
        log(f"| {target} | {measured} | {goal} | {'met' if ok else 'NOT met'} |")
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
