"""Engine throughput and latency against what a user would pick instead, in one
process on one machine, on the default SmolLM2-135M model.

Baselines: PEFT one request at a time (set_adapter + generate), PEFT's
mixed-adapter batch (generate(adapter_names=...), LoRA only), and
transformers' batched generate on the base model.

    python bench/bench_engine.py --quantization none      # dtype auto: bf16 where fast, else fp32
    python bench/bench_engine.py --quantization nf4 --many 0
    python bench/bench_engine.py --peft                   # also the (slow) PEFT baselines

Appends a section ending with a Targets table to bench/RESULTS.md (ratios are the
point on CPU). A target's ratio pairs each of its runs with a base-only run just
before it and takes the median of --pairs such ratios: this machine's speed drifts
by a quarter over minutes. The GEMM bound is the time the model's own linear layers take at the
batch size, measured here: the ceiling for any engine on this machine."""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from hotswap.server.config import AdapterCacheConfig, EngineConfig, ModelConfig
from hotswap.server.cpu_threads import in_passing_thread, serial
from hotswap.server.engine.packed_linears import can_pack
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore

from adapters import adapter_set
from machine import cpu_name, gemm_bound, model_order_pass

HERE = Path(__file__).parent
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "How do I boil an egg?",
    "Why is the sky blue? Answer briefly and clearly for a ten year old child who asked.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
]


def prompts(tok, n: int) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False)
            for i in range(n)]


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# -- the engine ------------------------------------------------------------------
def engine_run(core: ServingCore, jobs: list[tuple[str, list[int]]], new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.monotonic()
    streams = [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=params)) for a, p in jobs]
    results = [s.result(timeout=3600) for s in streams]
    elapsed = time.monotonic() - t0
    errors = [r.error for r in results if r.error]
    assert not errors, errors[:3]
    tokens = sum(len(r.token_ids) for r in results)
    return {"tok_s": tokens / elapsed, "elapsed": elapsed, "results": results}


def paired_ratio(core: ServingCore, base_jobs, jobs, new_tokens: int, pairs: int) -> tuple[float, float, float]:
    """(median workload / base ratio, median workload tok/s, median base tok/s) over `pairs` runs of base
    only immediately followed by the workload: on a shared machine whose speed drifts over minutes, a slow
    patch then lands on both sides of one ratio, not on one side of the only ratio."""
    ratios, ours, bases = [], [], []
    for _ in range(pairs):
        bases.append(engine_run(core, base_jobs, new_tokens)["tok_s"])
        ours.append(engine_run(core, jobs, new_tokens)["tok_s"])
        ratios.append(ours[-1] / bases[-1])
    return statistics.median(ratios), statistics.median(ours), statistics.median(bases)


def engine_poisson(core: ServingCore, jobs, new_tokens: int, rate: float, seed: int = 0) -> dict:
    rnd = random.Random(seed)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    streams, t0 = [], time.monotonic()
    next_at = t0
    for a, p in jobs:
        next_at += rnd.expovariate(rate)
        time.sleep(max(0.0, next_at - time.monotonic()))
        streams.append(core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=params)))
    results = [s.result(timeout=3600) for s in streams]
    elapsed = time.monotonic() - t0
    ttft = [r.time_to_first_token for r in results]
    tpot = [(r.total_time - r.time_to_first_token) / max(1, len(r.token_ids) - 1) for r in results]
    return {"tok_s": sum(len(r.token_ids) for r in results) / elapsed, "ttft": ttft, "tpot": tpot}


# -- baselines ---------------------------------------------------------------------
def hf_model(checkpoint: Path, quantization: str, dtype: torch.dtype):
    """The baseline model, loaded the way a user would, in the dtype the engine runs."""
    kw = {"dtype": dtype}
    if quantization == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(checkpoint, **kw).eval()


def _left_pad(batch: list[list[int]], pad: int):
    width = max(map(len, batch))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    return ids, mask


@torch.inference_mode()
def hf_generate(model, batch: list[list[int]], new_tokens: int, pad: int, **kw) -> int:
    ids, mask = _left_pad(batch, pad)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad, **kw)
    return (out.shape[1] - ids.shape[1]) * len(batch)


def hf_batched(model, jobs, new_tokens: int, pad: int, batch: int, **kw) -> float:
    t0, tokens = time.monotonic(), 0
    for i in range(0, len(jobs), batch):
        chunk = jobs[i: i + batch]
        names = [a or "__base__" for a, _ in chunk]
        extra = {"adapter_names": names} if kw.get("mixed") else {}
        tokens += hf_generate(model, [p for _, p in chunk], new_tokens, pad, **extra)
    return tokens / (time.monotonic() - t0)


def peft_one_at_a_time(peft: PeftModel, jobs, new_tokens: int, pad: int) -> float:
    t0, tokens = time.monotonic(), 0
    for a, p in jobs:
        if a:
            peft.set_adapter(a)
            tokens += hf_generate(peft, [p], new_tokens, pad)
        else:
            with peft.disable_adapter():
                tokens += hf_generate(peft, [p], new_tokens, pad)
    return tokens / (time.monotonic() - t0)


def baselines(args, only: set[str], loaded, lora_paths, ids, base_jobs, lora_jobs) -> tuple[float, dict, dict]:
    """transformers' batched generate and the GEMM bound on the base, and (with --peft) PEFT's
    rates per LoRA workload: {(set name, distinct): (one at a time, mixed batch)}."""
    n, T, pad = args.requests, args.new_tokens, loaded.tokenizer.pad_token_id
    hf = hf_model(loaded.checkpoint_dir, args.quantization, loaded.dtype)
    hf_base = hf_batched(hf, base_jobs, T, pad, batch=n)
    bound = gemm_bound(hf, n, loaded.dtype)
    bound["model_order"] = model_order_pass(hf, n, loaded.dtype)
    if can_pack(torch.device("cpu"), loaded.dtype) and args.quantization == "none":
        bound["model_order_packed"] = model_order_pass(hf, n, loaded.dtype, packed=True)
    rates = {}
    if args.peft and "lora" in only:
        for name, paths in lora_paths.items():
            peft = PeftModel.from_pretrained(hf, paths[0], adapter_name=ids[name][0])
            for adapter_id, p in zip(ids[name][1:], paths[1:]):
                peft.load_adapter(p, adapter_name=adapter_id)
            peft.eval()
            for distinct in (1, 16, 64):
                jobs = lora_jobs[name, distinct]
                rates[name, distinct] = (peft_one_at_a_time(peft, jobs[: args.one_at_a_time], T, pad),
                                         hf_batched(peft, jobs, T, pad, batch=n, mixed=True))
            hf = peft.unload()  # back to the plain base for the next set
            del peft
    return hf_base, bound, rates


# -- workloads -----------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", default="none", choices=["none", "nf4"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--peft", action="store_true", help="also run the PEFT baselines (one at a time, mixed batch); slow")
    ap.add_argument("--one-at-a-time", type=int, default=8, help="requests the PEFT one-at-a-time baseline runs (it is slow)")
    ap.add_argument("--many", type=int, default=1000, help="adapters in the many-adapters run (0 skips it)")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache/hotswap/bench")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--only", default="", help="comma list of workloads: lora,mixed,poisson,many")
    ap.add_argument("--pairs", type=int, default=3,
                    help="base-only / workload run pairs behind each target ratio (the ratio is their median)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else {"lora", "mixed", "poisson", "many"}
    torch.manual_seed(0)
    serial()  # this thread only submits and registers; the engine's thread computes (cpu_threads.py)
    n, T = args.requests, args.new_tokens
    loaded = load_base_model(ModelConfig(quantization=args.quantization))
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — engine throughput, {args.quantization} ({loaded.dtype}), {n} requests × {T} new tokens",
             f"\n`python bench/bench_engine.py --quantization {args.quantization} --requests {n} --new-tokens {T} "
             f"--many {args.many}{' --peft' if args.peft else ''}{' --only ' + args.only if args.only else ''}"
             f"{f' --pairs {args.pairs}' if args.pairs != 3 else ''}`"
             f" on {cpu_name()}, torch {torch.__version__}\n"]
    targets: list[tuple[str, float, str, bool]] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    tok = loaded.tokenizer
    ckpt = loaded.checkpoint_dir
    fp32_base = lambda: AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)  # noqa: E731
    work = args.workdir
    lora_sets = {  # name -> (PEFT kind, ranks): a typical attention adapter, and a heavy all-linear one
        "attention r16": ("lora-attn", [16]),
        "all-linear r8/16/32": ("lora", [8, 16, 32]),
    }
    # Everything but the engine runs on threads that end before the engine starts: libgomp
    # slows every OpenMP pool once two long-lived threads hold one (server/hotswap/server/cpu_threads.py),
    # which would slow the engine and the baselines alike. So the baselines run first.
    lora_paths = in_passing_thread(lambda: {name: adapter_set(fp32_base, work, kind, 64, ranks) for name, (kind, ranks) in lora_sets.items()})
    ids = {name: [f"lora{set_no}-{i}" for i in range(len(paths))] for set_no, (name, paths) in enumerate(lora_paths.items())}
    ps = prompts(tok, n)
    base_jobs = [("", p) for p in ps]
    lora_jobs = {(name, distinct): [(ids[name][i % distinct], p) for i, p in enumerate(ps)]
                 for name in lora_paths for distinct in (1, 16, 64)}
    hf_base, bound, peft_rates = in_passing_thread(baselines, args, only, loaded, lora_paths, ids, base_jobs, lora_jobs)

    engine_cfg = EngineConfig(max_batch_size=64, max_loras=64, kv_cache_bytes=2 * 2**30)
    core = ServingCore(loaded, engine_cfg, AdapterCacheConfig(device_bytes=8 * 2**30, host_bytes=16 * 2**30))
    for name, paths in lora_paths.items():
        for adapter_id, p in zip(ids[name], paths):
            core.register_adapter(adapter_id, p)
            core.adapters.load(core.resolve(adapter_id))  # steady state: already active (cold loads are measured below)
    engine_run(core, base_jobs[:4], 4)  # warm-up
    base = engine_run(core, base_jobs, T)["tok_s"]
    log("| workload | hotswap tok/s | baseline | baseline tok/s | ratio |\n|---|---|---|---|---|")
    log(f"| base only | {base:.0f} | transformers batched generate (batch {n}) | {hf_base:.0f} | {base / hf_base:.2f}× |")
    log(f"| base only | {base:.0f} | GEMM bound: the model's linears at batch {n} ({bound['gflops']:.0f} GFLOP/s) | {bound['tok_s']:.0f} | {base / bound['tok_s']:.0%} |")
    for key, how in (("model_order", "F.linear"), ("model_order_packed", "weights prepacked as the engine runs them")):
        if key in bound:
            order = bound[key]
            log(f"| base only | {base:.0f} | the model's linears once each, in model order, {how} (weights from memory; "
                f"{order['seconds'] * 1e3:.1f} ms per pass) | {order['tok_s']:.0f} | {base / order['tok_s']:.0%} |")
    targets += [("base only vs transformers batched generate", base / hf_base, "≥ 2.0×", base / hf_base >= 2.0),
                ("base only, fraction of the GEMM bound", base / bound["tok_s"], "≥ 50%", base / bound["tok_s"] >= 0.5)]

    if "lora" in only:
        for name in lora_paths:
            for distinct in (1, 16, 64):
                label = f"{distinct} LoRA ({name})"
                if distinct == 64 and name.startswith("all-linear"):  # a target: paired with base runs
                    ratio, ours, paired_base = paired_ratio(core, base_jobs, lora_jobs[name, distinct], T, args.pairs)
                    log(f"| {label} | {ours:.0f} | hotswap base only, run just before (median of {args.pairs} pairs) | "
                        f"{paired_base:.0f} | {ratio:.2f}× |")
                    targets.append(("64 distinct all-linear LoRA r8–32 vs own base only", ratio, "≥ 0.85×", ratio >= 0.85))
                else:
                    ours = engine_run(core, lora_jobs[name, distinct], T)["tok_s"]
                    log(f"| {label} | {ours:.0f} | hotswap base only | {base:.0f} | {ours / base:.2f}× |")
                if (name, distinct) in peft_rates:
                    one, mixed = peft_rates[name, distinct]
                    log(f"| {label} | {ours:.0f} | PEFT one at a time | {one:.0f} | {ours / one:.2f}× |")
                    log(f"| {label} | {ours:.0f} | PEFT mixed batch (adapter_names) | {mixed:.0f} | {ours / mixed:.2f}× |")

    if "mixed" in only:
        prompt_paths = in_passing_thread(adapter_set, fp32_base, work, "prompt", 8, [8, 16])
        prefix_paths = in_passing_thread(adapter_set, fp32_base, work, "prefix", 8, [8, 16])
        for i, p in enumerate(prompt_paths):
            core.register_adapter(f"prompt-{i}", p)
        for i, p in enumerate(prefix_paths):
            core.register_adapter(f"prefix-{i}", p)
        for i in range(8):
            core.adapters.load(core.resolve(f"prompt-{i}"))
            core.adapters.load(core.resolve(f"prefix-{i}"))
        kinds = ids["attention r16"][:8] + ids["all-linear r8/16/32"][:8] + [f"prompt-{i}" for i in range(8)] + [f"prefix-{i}" for i in range(8)] + [""] * 4
        jobs = [(kinds[i % len(kinds)], p) for i, p in enumerate(ps)]
        ratio, ours, paired_base = paired_ratio(core, base_jobs, jobs, T, args.pairs)
        log(f"| mixed LoRA + prompt + prefix + base | {ours:.0f} | hotswap base only, run just before (median of {args.pairs} pairs) | "
            f"{paired_base:.0f} | {ratio:.2f}× |")
        log(f"| mixed LoRA + prompt + prefix + base | {ours:.0f} | transformers batched generate, base | {hf_base:.0f} | {ours / hf_base:.2f}× |")
        targets.append(("LoRA + prompt + prefix + base mixed vs own base only", ratio, "≥ 0.85×", ratio >= 0.85))

    if "poisson" in only:
        jobs = [(ids["attention r16"][i % 16], p) for i, p in enumerate(ps)]
        rate = 0.6 * base / T  # requests/s at ~60% of base-only capacity
        r = engine_poisson(core, jobs, T, rate)
        log(f"\nPoisson arrivals, {rate:.2f} req/s, 16 LoRA adapters: {r['tok_s']:.0f} tok/s; "
            f"TTFT p50 {pct(r['ttft'], 50):.2f}s p90 {pct(r['ttft'], 90):.2f}s p99 {pct(r['ttft'], 99):.2f}s; "
            f"per-token p50 {pct(r['tpot'], 50) * 1e3:.0f}ms p90 {pct(r['tpot'], 90) * 1e3:.0f}ms p99 {pct(r['tpot'], 99) * 1e3:.0f}ms")
    core.close()

    if "many" in only and args.many:
        many_paths = in_passing_thread(adapter_set, fp32_base, work, "lora-qv", args.many, [8, 16, 24, 32, 40, 48, 56, 64])
        sizes = [p.stat().st_size for p in (q / "adapter_model.safetensors" for q in many_paths)]
        device_budget = 24 * statistics.mean(sizes)  # bf16 on device is half the fp32 file: ~48 adapters fit
        core = ServingCore(loaded, engine_cfg, AdapterCacheConfig(device_bytes=int(device_budget), host_bytes=int(4 * device_budget)))
        for i, p in enumerate(many_paths):
            core.register_adapter(f"many-{i}", p)
        rnd = random.Random(0)
        weights = [1 / (i + 1) ** 1.1 for i in range(args.many)]
        reqs = 4 * n
        picks = rnd.choices(range(args.many), weights, k=reqs)
        jobs = [(f"many-{k}", prompts(tok, reqs)[i]) for i, k in enumerate(picks)]
        base_many = engine_run(core, [("", p) for _, p in jobs], T // 2)["tok_s"]
        ours = engine_run(core, jobs, T // 2)["tok_s"]
        stats = core.adapters.stats()
        loads, promotes, waits = stats.load_durations, stats.promote_durations, stats.room_waits
        log(f"\n{args.many} LoRA adapters (q,v; ranks 8–64), Zipf(1.1) popularity, {reqs} requests × {T // 2} tokens, "
            f"device cache {device_budget / 2**20:.0f} MiB (~{device_budget / (statistics.mean(sizes) / 2):.0f} adapters): "
            f"{ours:.0f} tok/s vs base-only {base_many:.0f} tok/s = {ours / base_many:.2f}×; "
            f"{len(set(picks))} distinct adapters used, {stats.loads} loads, {stats.evictions} evictions; "
            f"cold load from disk ({len(loads)}) p50 {pct(loads, 50) * 1e3:.0f}ms p90 {pct(loads, 90) * 1e3:.0f}ms "
            f"p99 {pct(loads, 99) * 1e3:.0f}ms; host→device ({len(promotes)}) p50 {pct(promotes, 50) * 1e3:.1f}ms "
            f"p99 {pct(promotes, 99) * 1e3:.1f}ms; then waiting for device room held by running rows "
            f"p50 {pct(waits, 50) * 1e3:.0f}ms p99 {pct(waits, 99) * 1e3:.0f}ms")
        targets.append((f"{args.many} Zipf-popular adapters, small device cache, vs own base only", ours / base_many, "≥ 0.8×", ours / base_many >= 0.8))
        core.close()

    log("\n| target | measured | goal | met / NOT met |\n|---|---|---|---|")
    for target, value, goal, ok in targets:
        shown = f"{value:.0%}" if goal.endswith("%") else f"{value:.2f}×"
        log(f"| {target} | {shown} | {goal} | {'met' if ok else 'NOT met'} |")
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
