"""The engine on a GPU at a real model shape: a Llama-3-8B-shaped model with random
weights (nothing can be downloaded on the GPU machine; speed does not depend on the
values) in bitsandbytes NF4, with 1, 64 and 512 distinct LoRA adapters, adapter
cold-load time and memory, next to the physical bound of a decode step.

    python bench/bench_gpu.py                        # on the GPU machine
    python bench/bench_gpu.py --shape tiny --device cpu --requests 8 --new-tokens 8   # smoke run anywhere

Bound: a decode step must read every weight byte once (NF4: ~0.5 byte per parameter
plus the quantization constants) plus the LoRA factors of the batch and the KV cache;
HBM bandwidth / bytes per step is the ceiling on steps per second.
Appends a section to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
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
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    vocab = {f"<t{i}>": i for i in range(cfg.vocab_size)}
    for i in range(256):  # bytes map onto the first ids so any text tokenizes
        vocab[chr(0x100 + i)] = 3 + i
    vocab = {k: v for k, v in vocab.items() if not (k.startswith("<t") and 3 <= v < 259)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
    import json

    from safetensors.torch import save_file

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    dims = {"q_proj": (cfg.hidden_size, cfg.hidden_size), "k_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim),
            "v_proj": (cfg.hidden_size, cfg.num_key_value_heads * head_dim), "o_proj": (cfg.hidden_size, cfg.hidden_size)}
    paths = []
    for i in range(n):
        d = out / f"lora-{i:04d}"
        paths.append(d)
        if (d / "adapter_model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(cfg.num_hidden_layers):
            for name, (fan_in, fan_out) in dims.items():
                key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
        save_file(tensors, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
            "target_modules": list(dims), "bias": "none", "fan_in_fan_out": False, "use_rslora": False}))
    return paths


def run(core: ServingCore, adapters: list[str], n: int, new: int) -> dict:
    prompts = [[3 + (i * 7 + j) % 200 for j in range(32 + (i % 4) * 32)] for i in range(n)]
    t0 = time.monotonic()
    streams = [core.submit(GenerateRequest(prompt_ids=p, adapter_id=adapters[i % len(adapters)] if adapters else "",
                                           params=SamplingParams(max_new_tokens=new, ignore_eos=True))) for i, p in enumerate(prompts)]
    results = [s.result(3600) for s in streams]
    wall = time.monotonic() - t0
    tokens = sum(len(r.token_ids) for r in results)
    ttft = sorted(r.time_to_first_token for r in results)
    tpot = sorted((r.total_time - r.time_to_first_token) / max(1, len(r.token_ids) - 1) for r in results)
    return {"tok_s": tokens / wall, "ttft_p50": statistics.median(ttft), "ttft_p99": ttft[int(0.99 * (len(ttft) - 1))],
            "tpot_p50": statistics.median(tpot), "tpot_p99": tpot[int(0.99 * (len(tpot) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapter-counts", default="1,64,512")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hotswap-bench-gpu")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    counts = [int(c) for c in args.adapter_counts.split(",")]
    ckpt = build_checkpoint(args.shape, args.workdir / args.shape)
    paths = build_adapters(ckpt, args.workdir / f"{args.shape}-lora-r{args.rank}", max(counts), args.rank)

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    core = ServingCore.from_config(ModelConfig(source=str(ckpt), quantization="nf4", device=args.device),
                                   EngineConfig(max_batch_size=args.max_batch_size, max_tokens_per_step=16384, max_seq_len=1024),
                                   AdapterCacheConfig(device_bytes=16 * 2**30, host_bytes=32 * 2**30, max_lora_rank=64))
    load_s = time.monotonic() - t0
    base_mem = torch.cuda.memory_allocated() if cuda else 0
    names = []
    for i, p in enumerate(paths):
        names.append(core.register_adapter(f"lora{i}", p).id)
    cold = []
    for name in names[: min(32, len(names))]:  # cold load: disk -> host -> device
        t = time.monotonic()
        core.adapters.load(name)
        cold.append(time.monotonic() - t)
    run(core, [], min(8, args.requests), 4)  # warm-up
    rows = [("base only", run(core, [], args.requests, args.new_tokens))]
    for c in counts:
        for name in names[:c]:
            core.adapters.load(name)
        rows.append((f"{c} LoRA r{args.rank} (attention)", run(core, names[:c], args.requests, args.new_tokens)))
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    core.close()

    params = sum(t.numel() for t in AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[args.shape])).parameters()) if args.shape == "tiny" else 8.03e9
    gpu = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in gpu), None)
    weight_bytes = params * 0.5 * 1.03  # NF4 + block constants (double-quantized)
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — {args.shape}-shaped model (random weights), NF4, on {gpu}\n",
             f"`python bench/bench_gpu.py --shape {args.shape} --requests {args.requests} --new-tokens {args.new_tokens} "
             f"--max-batch-size {args.max_batch_size} --adapter-counts {args.adapter_counts}`; torch {torch.__version__}\n",
             "| workload | tok/s | TTFT p50 | TTFT p99 | per-token p50 | per-token p99 |", "|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['tok_s']:.0f} | {r['ttft_p50']:.3f}s | {r['ttft_p99']:.3f}s | {r['tpot_p50'] * 1e3:.1f}ms | {r['tpot_p99'] * 1e3:.1f}ms |")
    lines.append(f"\nmodel load {load_s:.1f}s; adapter cold load p50 {statistics.median(cold) * 1e3:.1f}ms max {max(cold) * 1e3:.1f}ms; "
                 f"memory: base {base_mem / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB")
    if bw:
        bound = bw / weight_bytes
        lines.append(f"\nPhysical bound: {bw / 1e12:.2f} TB/s HBM / {weight_bytes / 1e9:.2f} GB of NF4 weights per decode step "
                     f"= {bound:.0f} steps/s at most (before KV-cache and LoRA bytes); at batch {args.max_batch_size} that is "
                     f"{bound * min(args.max_batch_size, args.requests):.0f} tok/s.")
    text = "\n".join(lines) + "\n"
    print(text)
    with args.out.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
