"""The server on a GPU at a real model shape: a Llama-3-8B-shaped model with random
weights (nothing can be downloaded on the GPU machine; speed does not depend on the
values) in bitsandbytes NF4 and in bf16, with 1, 64 and 512 distinct LoRA adapters,
adapter cold-load time and memory, next to the physical bound of a decode step; then
the same 64-adapter workload through a real `hotswap-server` process over gRPC.

    python bench/bench_gpu.py                        # on the GPU machine
    python bench/bench_gpu.py --shape tiny --device cpu --requests 8 --new-tokens 8 --adapter-counts 1,4 --grpc-adapters 2 --out /tmp/x.md   # smoke run anywhere

Bound: a decode step must read every weight byte once (NF4: ~0.5 byte per parameter
plus the quantization constants, bf16: 2 bytes; the output head stays bf16), the LoRA factors of the
distinct adapters in the batch and each row's KV cache. Device bandwidth (measured
here with a large device-to-device copy) / bytes per step is the ceiling on steps per
second; times the batch, on tokens per second.
Appends a section to bench/RESULTS.md (or --out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from hotswap.server.config import AdapterCacheConfig, EngineConfig, ModelConfig
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.serving import ServingCore

from adapters import make_variant

HERE = Path(__file__).resolve().parent
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=4096, max_position_embeddings=2048),
}
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def build_checkpoint(shape: str, out: Path) -> Path:
    """Random weights in bf16, saved with a byte-level tokenizer of the right vocab size."""
    if (out / "config.json").exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    # Byte-level BPE without merges: any text is one token per byte (ids 3..258), so
    # text prompts through the gRPC API have the lengths the engine run gives by id.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<t0>": 0, "<t1>": 1, "<t2>": 2, **{ch: 3 + i for i, ch in enumerate(alphabet)}}
    vocab.update({f"<t{i}>": i for i in range(3 + len(alphabet), cfg.vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<t1>", eos_token="<t2>", pad_token="<t0>").save_pretrained(out)
    return out


def build_adapters(ckpt: Path, out: Path, n: int, rank: int) -> list[Path]:
    """`n` LoRA adapters on the attention projections. Small shapes go through PEFT itself;
    at 8B the factors are written directly in PEFT's layout (no CPU copy of the model)."""
    cfg = LlamaConfig.from_pretrained(ckpt)
    if cfg.hidden_size > 1024:
        return _direct_adapters(cfg, out, n, rank)
    template = out / "template"
    if not (template / "adapter_model.safetensors").exists():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        lora = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        get_peft_model(model, lora).save_pretrained(template)
    return [make_variant(template, out / f"lora-{i:04d}", seed=i) for i in range(n)]


def _direct_adapters(cfg: LlamaConfig, out: Path, n: int, rank: int) -> list[Path]:
    """Random factors drawn on the GPU and saved in bf16 (as PEFT saves adapters trained
    in bf16): 512 rank-16 attention adapters are 14 GB on disk this way, not 28."""
    from safetensors.torch import save_file

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    dims = {"q_proj": (cfg.hidden_size, cfg.hidden_size), "k_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
            "v_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim), "o_proj": (cfg.hidden_size, cfg.hidden_size)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = []
    for i in range(n):
        d = out / f"lora-{i:04d}"
        paths.append(d)
        if (d / "adapter_model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator(device).manual_seed(i)
        tensors = {}
        for layer in range(cfg.num_hidden_layers):
            for name, (fan_in, fan_out) in dims.items():
                key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g, device=device) / fan_in ** 0.5).bfloat16().cpu()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g, device=device) * 0.01).bfloat16().cpu()
        save_file(tensors, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
            "target_modules": list(dims), "bias": "none", "fan_in_fan_out": False, "use_rslora": False}))
    return paths


def prompt_ids(n: int) -> list[list[int]]:
    """32..128 tokens each, ids of the byte tokens (text_of gives the same prompt as text)."""
    return [[3 + (i * 7 + j) % 94 for j in range(32 + (i % 4) * 32)] for i in range(n)]


def text_of(ids: list[int]) -> str:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    return bytes(byte_of[alphabet[i - 3]] for i in ids).decode("latin-1")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads of the base: every parameter and buffer except the input
    embedding (one row per token), NF4's packed weights plus their quantization constants."""
    embed = model.get_input_embeddings().weight
    total, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t is embed or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if getattr(qs, "state2", None) is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.state2.code.numel() * 4
            total += qs.code.numel() * 4
    return total


def measured_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2**30 / statistics.median(times)


def summarize(wall: float, results: list[tuple[float, float, int]]) -> dict:
    """results: (time to first token, total time, tokens) per request."""
    ttft = sorted(r[0] for r in results)
    tpot = sorted((total - first) / max(1, n - 1) for first, total, n in results)
    pick = lambda xs, p: xs[int(p * (len(xs) - 1))]  # noqa: E731
    return {"tok_s": sum(r[2] for r in results) / wall, "ttft_p50": statistics.median(ttft), "ttft_p99": pick(ttft, 0.99),
            "tpot_p50": statistics.median(tpot), "tpot_p99": pick(tpot, 0.99)}


def run(core: ServingCore, adapters: list[str], n: int, new: int) -> dict:
    t0 = time.monotonic()
    streams = [core.submit(GenerateRequest(prompt_ids=p, adapter_id=adapters[i % len(adapters)] if adapters else "",
                                           params=SamplingParams(max_new_tokens=new, ignore_eos=True))) for i, p in enumerate(prompt_ids(n))]
    results = [s.result(3600) for s in streams]
    wall = time.monotonic() - t0
    return summarize(wall, [(r.time_to_first_token, r.total_time, len(r.token_ids)) for r in results])


def run_grpc(ckpt: Path, adapter_paths: list[Path], n: int, new: int, args: argparse.Namespace, quantization: str,
             work: Path) -> tuple[dict, float]:
    """The same workload through a real hotswap-server child process and the asyncio SDK."""
    from hotswap.client import AsyncClient

    cmd = [sys.executable, "-m", "hotswap.server.api.app", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
           "--data-dir", str(work), "--model", str(ckpt), "--quantization", quantization, "--device", args.device,
           "--max-batch-size", str(args.max_batch_size), "--max-loras", str(args.max_batch_size),
           "--max-tokens-per-step", "16384", "--max-seq-len", "1024",
           "--max-queue", str(max(1024, n)), "--adapter-device-cache-mb", "16384", "--adapter-host-cache-mb", "32768",
           "--tuner-workers", "0", "--allowed-adapter-dir", str(adapter_paths[0].parent)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port, log = None, []
    for line in proc.stdout:
        log.append(line)
        if m := re.search(r"grpc port (\d+)", line):
            port = m[1]
        if "hotswap: serving" in line:
            break
    if port is None:
        raise SystemExit("server did not start:\n" + "".join(log[-40:]))
    start_s = time.monotonic() - t0
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    target = f"127.0.0.1:{port}"
    prompts = [text_of(p) for p in prompt_ids(n)]

    async def go() -> dict:
        async with AsyncClient(target, timeout=3600) as c:
            names = [(await c.register_adapter(f"lora{i}", str(p))).id for i, p in enumerate(adapter_paths)]

            async def one(i: int) -> tuple[float, float, int]:
                t = time.monotonic()
                first, count = None, 0
                async for ch in c.stream(prompts[i], adapter=names[i % len(names)], max_new_tokens=new, ignore_eos=True):
                    if ch.token_ids and first is None:
                        first = time.monotonic() - t
                    count += len(ch.token_ids)
                return first, time.monotonic() - t, count

            await asyncio.gather(*[one(i) for i in range(min(len(names), n))])  # warm-up: every adapter loaded once
            t = time.monotonic()
            results = await asyncio.gather(*[one(i) for i in range(n)])
            return summarize(time.monotonic() - t, list(results))

    try:
        return asyncio.run(go()), start_s
    finally:
        proc.terminate()
        proc.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quantization", default="nf4,none", help="comma list: nf4 and/or none (bf16); one section each")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapter-counts", default="1,64,512")
    ap.add_argument("--grpc-adapters", type=int, default=64, help="adapters in the run through hotswap-server; 0 skips it")
    ap.add_argument("--decode-graphs", default="both", choices=["off", "on", "both"],
                    help="decode steps eager, replayed as CUDA graphs (engine/static_decode.py), or each workload both ways")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hotswap-bench-gpu")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    counts = [int(c) for c in args.adapter_counts.split(",")]
    cuda = torch.cuda.is_available() and args.device != "cpu"
    bw = measured_bandwidth() if cuda else None
    t0 = time.monotonic()
    ckpt = build_checkpoint(args.shape, args.workdir / args.shape)
    paths = build_adapters(ckpt, args.workdir / f"{args.shape}-lora-r{args.rank}", max(counts + [args.grpc_adapters]), args.rank)
    say(f"checkpoint and {len(paths)} adapters built in {time.monotonic() - t0:.0f}s")
    for quantization in args.quantization.split(","):
        text = measure(args, quantization, ckpt, paths, counts, cuda, bw)
        print(text)
        with args.out.open("a") as f:
            f.write(text)


def say(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def measure(args: argparse.Namespace, quantization: str, ckpt: Path, paths: list[Path], counts: list[int], cuda: bool,
            bw: float | None) -> str:
    """One quantization: engine runs with 1 / 64 / 512 adapters, then the gRPC run; a RESULTS section."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    core = ServingCore.from_config(ModelConfig(source=str(ckpt), quantization=quantization, device=args.device),
                                   EngineConfig(max_batch_size=args.max_batch_size, max_tokens_per_step=16384, max_seq_len=1024,
                                                max_queue=max(1024, args.requests), max_loras=args.max_batch_size,
                                                decode_graphs=args.decode_graphs != "off"),
                                   AdapterCacheConfig(device_bytes=16 * 2**30, host_bytes=32 * 2**30, max_lora_rank=64))
    load_s = time.monotonic() - t0
    model = core.loaded.model
    wbytes = weight_bytes(model)
    mem = {"after model load (incl. the paged KV pool)": torch.cuda.memory_allocated() if cuda else 0}
    say(f"model loaded in {load_s:.0f}s; {wbytes / 1e9:.2f} GB read per decode step")
    names = [core.register_adapter(f"lora{i}", p).id for i, p in enumerate(paths[: max(counts)])]
    cold = []
    for name in names[: min(32, len(names))]:  # disk (page cache) -> host -> device
        t = time.monotonic()
        core.adapters.load(name)
        if cuda:
            torch.cuda.synchronize()
        cold.append(time.monotonic() - t)
    runner = core.engine.runner
    static = runner.static

    def ways(label: str, distinct: int, adapters: list[str], n: int) -> list[tuple[str, int, dict]]:
        """The workload eager and/or through CUDA graphs (the same engine: its static path switched off and on)."""
        out = []
        for graphs in ([False, True] if args.decode_graphs == "both" else [args.decode_graphs == "on"]):
            runner.static = static if graphs else None
            out.append((label + (", CUDA graphs" if graphs else ""), distinct, run(core, adapters, n, args.new_tokens)))
            say(out[-1][0], out[-1][2])
        return out

    run(core, [], min(8, args.requests), 4)  # warm-up
    rows = ways("base only", 0, [], args.requests)
    for c in counts:
        for name in names[:c]:
            core.adapters.load(name)
        n = max(args.requests, c)  # every adapter gets at least one request
        rows += ways(f"{c} distinct LoRA r{args.rank} (attention), {n} requests", c, names[:c], n)
    mem[f"with {max(counts)} adapters resident"] = torch.cuda.memory_allocated() if cuda else 0
    mem["peak"] = torch.cuda.max_memory_allocated() if cuda else 0
    text_cfg = model.config.get_text_config()
    kv_heads, layers = text_cfg.num_key_value_heads, text_cfg.num_hidden_layers
    head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads
    core.close()
    del core, model
    if cuda:
        torch.cuda.empty_cache()

    grpc_row = None
    if args.grpc_adapters:
        grpc, start_s = run_grpc(ckpt, paths[: args.grpc_adapters], args.requests, args.new_tokens, args, quantization,
                                 Path(tempfile.mkdtemp(prefix="hotswap-bench-gpu-server-")))
        grpc_row = (f"{args.grpc_adapters} distinct LoRA, through hotswap-server over gRPC", args.grpc_adapters, grpc)
        say(grpc_row[0], grpc, f"server start {start_s:.0f}s")

    gpu = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    adapter_bytes = (paths[0] / "adapter_model.safetensors").stat().st_size
    batch = min(args.max_batch_size, args.requests)
    avg_len = statistics.mean(len(p) for p in prompt_ids(args.requests)) + args.new_tokens / 2
    kv_bytes = batch * avg_len * layers * 2 * kv_heads * head_dim * 2  # bf16 K and V

    def bound(distinct: int) -> float | None:
        return bw / (wbytes + min(distinct, batch) * adapter_bytes + kv_bytes) * batch if bw else None

    qlabel = {"nf4": "NF4", "none": "bf16"}.get(quantization, quantization)
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — {args.shape}-shaped model (random weights), {qlabel}, on {gpu}\n",
             f"`python bench/bench_gpu.py --shape {args.shape} --quantization {quantization} --requests {args.requests} --new-tokens {args.new_tokens} "
             f"--max-batch-size {args.max_batch_size} --adapter-counts {args.adapter_counts} --grpc-adapters {args.grpc_adapters} "
             f"--decode-graphs {args.decode_graphs}`; "
             f"torch {torch.__version__}. {args.requests} requests at once, prompts 32–128 tokens, {args.new_tokens} new tokens each.\n",
             "| workload | tok/s | bound tok/s | of bound | TTFT p50 | TTFT p99 | per-token p50 | per-token p99 |",
             "|---|---|---|---|---|---|---|---|"]
    for label, distinct, r in rows + ([grpc_row] if grpc_row else []):
        b = bound(distinct)
        b = f"{b:.0f} | {r['tok_s'] / b:.0%}" if b else "– | –"
        lines.append(f"| {label} | {r['tok_s']:.0f} | {b} | "
                     f"{r['ttft_p50']:.3f}s | {r['ttft_p99']:.3f}s | {r['tpot_p50'] * 1e3:.1f}ms | {r['tpot_p99'] * 1e3:.1f}ms |")
    lines.append(f"\nModel load {load_s:.1f}s. Adapter cold load (page cache → host → device, {adapter_bytes / 2**20:.0f} MiB each) "
                 f"p50 {statistics.median(cold) * 1e3:.1f}ms, max {max(cold) * 1e3:.1f}ms. Memory allocated: "
                 + "; ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in mem.items()) + ".")
    if bw:
        lines.append(f"\nBound: {bw / 1e12:.2f} TB/s measured device-to-device copy ÷ bytes per decode step: {wbytes / 1e9:.2f} GB of "
                     f"{qlabel} weights and bf16 head, {kv_bytes / 1e9:.2f} GB of KV cache at batch {batch}, plus {adapter_bytes / 1e6:.0f} MB "
                     f"per distinct adapter in the batch (at most {batch}) — {bw / (wbytes + kv_bytes):.0f} steps/s for the base.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
