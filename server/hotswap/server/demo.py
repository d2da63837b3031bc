"""In-process demo: load the default model, register one adapter of each kind,
serve a mixed batch (with base-model rows) and print what each request got.

The adapters are made here with PEFT so the demo needs no downloads:
- a prompt-tuning adapter initialised from an instruction's token embeddings,
- a prefix-tuning adapter whose key/values are the base model's own key/values
  for an instruction (so it behaves like that text prepended),
- a LoRA adapter with small random weights on every linear.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import DynamicCache

from .config import EngineConfig, ModelConfig
from .engine.request import GenerateRequest, SamplingParams
from .serving import ServingCore

PIRATE = "You are a pirate. Answer every question like a pirate, with 'Arr'."
FRENCH = "Always answer in French, and only in French."


def _fresh_base(core: ServingCore):
    """A plain (unquantized, fp32) copy of the base for PEFT to build adapters on."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(core.loaded.checkpoint_dir, dtype=torch.float32)


def make_demo_adapters(core: ServingCore, out: Path) -> dict[str, Path]:
    tok = core.loaded.tokenizer
    paths = {}

    base = _fresh_base(core)
    prompt_cfg = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=PIRATE,
        num_virtual_tokens=len(tok(PIRATE)["input_ids"]),
        tokenizer_name_or_path=str(core.loaded.checkpoint_dir),
    )
    get_peft_model(base, prompt_cfg).save_pretrained(out / "pirate-prompt")
    paths["pirate-prompt"] = out / "pirate-prompt"

    base = _fresh_base(core)
    ids = torch.tensor([tok(FRENCH)["input_ids"]])
    with torch.no_grad():
        cache = base(ids, past_key_values=DynamicCache(config=base.config), use_cache=True).past_key_values
    n = ids.shape[1]
    peft = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n))
    # PEFT stores the prefix as [n, layers * 2 * kv_heads * head_dim]; fill it with the base
    # model's own key/values for the instruction (already rotated for positions 0..n-1).
    kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])  # (L, 2, kvh, n, hd)
    kv = kv.permute(3, 0, 1, 2, 4).reshape(n, -1)
    peft.prompt_encoder["default"].embedding.weight.data.copy_(kv)
    peft.save_pretrained(out / "french-prefix")
    paths["french-prefix"] = out / "french-prefix"

    base = _fresh_base(core)
    peft = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.002
    peft.save_pretrained(out / "noisy-lora")
    paths["noisy-lora"] = out / "noisy-lora"
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="HF folder, hub id (from the local cache), .gguf file, or 'default'")
    ap.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--cache-dir", type=Path, default=None, help="where a GGUF model is converted once (default ~/.cache/hotswap)")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    core = ServingCore.from_config(
        ModelConfig(source=args.model, quantization=args.quantization, dtype=args.dtype,
                    **({"cache_dir": args.cache_dir} if args.cache_dir else {})),
        EngineConfig(max_batch_size=16, max_seq_len=1024),
    )
    print(f"loaded {core.loaded.checkpoint_dir} ({args.quantization}, {core.loaded.dtype}) in {time.monotonic() - t0:.1f}s")
    with core, tempfile.TemporaryDirectory() as tmp:
        for adapter_id, path in make_demo_adapters(core, Path(tmp)).items():
            a = core.register_adapter(adapter_id, path)
            print(f"registered {a.id}: {a.peft_type}, {a.size_bytes / 1e6:.2f} MB")
        questions = ["What is the capital of France?", "How do I boil an egg?"]
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        jobs = [(a, q) for q in questions for a in ("", "pirate-prompt", "french-prefix", "noisy-lora")]
        t0 = time.monotonic()
        streams = [
            core.submit(GenerateRequest(messages=[{"role": "user", "content": q}], adapter_id=a, params=params))
            for a, q in jobs
        ]
        results = [s.result(timeout=600) for s in streams]
        elapsed = time.monotonic() - t0
        for (a, q), r in zip(jobs, results):
            text = " ".join(r.text.split())
            print(f"\n[{a or 'base'}] {q}\n  -> {text}\n  ({len(r.token_ids)} tokens, {r.finish_reason.value}, ttft {r.time_to_first_token:.2f}s)")
        total = sum(len(r.token_ids) for r in results)
        print(f"\n{len(results)} requests, {len(jobs)} in one continuous batch: {total} tokens in {elapsed:.1f}s ({total / elapsed:.0f} tok/s)")


if __name__ == "__main__":
    main()
