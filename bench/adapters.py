"""Adapters for benchmarks, in PEFT's own format. Each kind is created once by
PEFT (so key names and config are exactly PEFT's); many variants of one kind
are then written as copies with fresh random tensors, which is what 1,000
registered adapters need without 1,000 get_peft_model calls."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file, save_file

KINDS = {
    "lora": lambda r: LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=2 * r, target_modules="all-linear"),
    "lora-attn": lambda r: LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "lora-qv": lambda r: LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]),
    "prompt": lambda r: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=r),
    "prefix": lambda r: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=r),
}


def make_template(base_factory, kind: str, size: int, out: Path) -> Path:
    """One adapter saved by PEFT (size = rank for LoRA, virtual tokens otherwise)."""
    if not (out / "adapter_model.safetensors").exists():
        peft = get_peft_model(base_factory(), KINDS[kind](size))
        peft.save_pretrained(out)
    return out


def make_variant(template: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    """A copy of `template` with fresh random weights (LoRA B non-zero, so it changes outputs)."""
    if (out / "adapter_model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(template / "adapter_model.safetensors")
    fresh = {k: (torch.randn(v.shape, generator=gen) * (scale if "lora_B" in k else 1 / v.shape[-1] ** 0.5)).to(v.dtype)
             for k, v in tensors.items()}
    if "prompt_embeddings" in fresh:
        fresh["prompt_embeddings"] = tensors["prompt_embeddings"] + torch.randn(
            tensors["prompt_embeddings"].shape, generator=gen).to(tensors["prompt_embeddings"].dtype) * scale
    save_file(fresh, out / "adapter_model.safetensors")
    shutil.copy(template / "adapter_config.json", out / "adapter_config.json")
    return out


def adapter_set(base_factory, root: Path, kind: str, count: int, sizes: list[int]) -> list[Path]:
    """`count` adapters of one kind, sizes cycling through `sizes`."""
    templates = {s: make_template(base_factory, kind, s, root / f"template-{kind}-{s}") for s in sizes}
    return [make_variant(templates[sizes[i % len(sizes)]], root / f"{kind}-{i:04d}", seed=i) for i in range(count)]

