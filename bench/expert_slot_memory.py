"""Device memory of the slot tables for LoRA on MoE experts (engine/expert_lora.py, ParamSlots): what the
first expert adapter's load allocates, at --max-loras' default number of slots against --max-expert-loras'
default, on real MoE shapes (configs written out here, weights on the meta device: nothing is downloaded or
allocated; the bytes come from ParamSlots.growth_bytes, the figure the engine checks against free memory).

    python bench/expert_slot_memory.py [--rank 16]

Appends a section to bench/RESULTS.md."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

from hotswap.server.adapters.weights import ParamLoraWeights
from hotswap.server.config import EngineConfig
from hotswap.server.engine.expert_lora import ParamSlots
from hotswap.server.model.experts import param_targets

HERE = Path(__file__).parent
MODELS = {
    "Qwen3-30B-A3B": lambda: Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_hidden_layers=48,
                                            num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4,
                                            head_dim=128, vocab_size=151936),
    "Mixtral-8x7B": lambda: MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_local_experts=8,
                                          num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "OLMoE-1B-7B": lambda: OlmoeConfig(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_experts=64,
                                       num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=16, vocab_size=50304),
}


def expert_adapter(features: dict, rank: int) -> dict[str, ParamLoraWeights]:
    """An adapter of `rank` on every fused expert weight (what PEFT's "all-linear" reaches on these models)."""
    return {key: ParamLoraWeights(torch.empty(f.experts, rank, f.in_features, device="meta"),
                                  torch.empty(f.experts, f.out_features, rank, device="meta"), 1.0)
            for key, f in features.items() if f.experts > 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args()
    slots_before, slots_now = EngineConfig().max_loras, EngineConfig().max_expert_loras
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — LoRA slot tables on MoE experts (bf16, rank {args.rank})",
             f"\n`python bench/expert_slot_memory.py --rank {args.rank}` (shapes only: meta-device models, nothing allocated)\n",
             f"| model | expert weights | tables for {slots_before} slots (every LoRA slot, before) | "
             f"for {slots_now} slots (--max-expert-loras default) |", "|---|---|---|---|"]
    for name, config in MODELS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config(), dtype=torch.bfloat16)
        features = param_targets(model).features
        adapter = expert_adapter(features, args.rank)
        sizes = [ParamSlots(features, n, torch.device("cpu"), torch.bfloat16).growth_bytes(adapter) / 2**30
                 for n in (slots_before, slots_now)]
        lines.append(f"| {name} | {len(adapter)} | {sizes[0]:.2f} GiB | {sizes[1]:.2f} GiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    with args.out.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
