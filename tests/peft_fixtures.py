"""Real adapters, created and saved by PEFT itself, with non-zero random weights."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    AdaptionPromptConfig,
    IA3Config,
    TrainableTokensConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)

CAUSAL = TaskType.CAUSAL_LM


def _config(kind: str, model, **kw):
    task = kw.get("task", CAUSAL)  # SEQ_CLS for classification adapters
    if kind == "lora":
        return LoraConfig(task_type=task, r=kw.get("r", 4), lora_alpha=kw.get("alpha", 8), target_modules=kw.get("targets", ["q_proj", "k_proj", "v_proj", "o_proj"]))
    if kind == "lora_params":  # LoRA on parameters (MoE expert / router weights), with or without target_modules
        return LoraConfig(task_type=task, r=kw.get("r", 4), lora_alpha=kw.get("alpha", 8), target_modules=kw.get("targets"),
                          target_parameters=kw["params"])
    if kind == "lora_mlp":
        # Different ranks and alphas per module exercise rank_pattern / alpha_pattern.
        return LoraConfig(task_type=task, r=6, lora_alpha=12, target_modules=["gate_proj", "up_proj", "down_proj", "v_proj"],
                          rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3})
    if kind == "rslora":
        return LoraConfig(task_type=task, r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear")
    if kind == "adalora":
        return AdaLoraConfig(task_type=task, init_r=6, target_r=3, lora_alpha=10, total_step=10, target_modules=["q_proj", "v_proj", "down_proj"])
    if kind == "adalora_pruned":
        return AdaLoraConfig(task_type=task, init_r=6, target_r=2, lora_alpha=10, tinit=1, tfinal=1, deltaT=1,
                             total_step=6, target_modules=["q_proj", "v_proj", "down_proj"])
    if kind == "dora":
        return LoraConfig(task_type=CAUSAL, r=4, lora_alpha=8, use_dora=True, target_modules=kw.get("targets", ["q_proj", "v_proj", "o_proj", "down_proj"]))
    if kind == "lora_bias":  # lora_B gets a bias: PEFT allows it only on linears that have one (Qwen2's q/k/v)
        return LoraConfig(task_type=CAUSAL, r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "k_proj", "v_proj"])
    if kind == "lora_trained_bias":  # bias="lora_only": the targeted linears' own biases train too (Qwen2's q/v have them), with DoRA
        return LoraConfig(task_type=CAUSAL, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj"], bias="lora_only")
    if kind == "lora_bias_all":  # bias="all": k_proj's bias trains though LoRA does not target k_proj
        return LoraConfig(task_type=CAUSAL, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], bias="all")
    if kind == "adalora_heads":  # AdaLoRA with fully trained copies of the embedding and the output head
        return AdaLoraConfig(task_type=CAUSAL, init_r=6, target_r=3, lora_alpha=10, total_step=10, target_modules=["q_proj", "v_proj"],
                             modules_to_save=["lm_head", "embed_tokens"])
    if kind == "ia3":  # down_proj scales its input, the others their outputs
        return IA3Config(task_type=CAUSAL, target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    if kind == "lora_heads":  # fully trained copies of the embedding and the output head, applied per row
        return LoraConfig(task_type=CAUSAL, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "embed_tokens"])
    if kind == "lora_embed":  # LoRA on the embedding itself (lora_embedding_A/B)
        return LoraConfig(task_type=CAUSAL, r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])
    if kind == "lora_tokens":  # trainable tokens: rows of the embedding (and a tied head) replaced
        return LoraConfig(task_type=CAUSAL, r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=list(range(3, 400, 5)))
    if kind == "tokens":
        return TrainableTokensConfig(task_type=CAUSAL, token_indices=list(range(400, 4, -6)))  # unsorted on purpose
    if kind == "adaption":  # LLaMA-Adapter: gated prompts in the top two layers (Llama / Mistral only)
        return AdaptionPromptConfig(task_type=CAUSAL, adapter_len=4, adapter_layers=2)
    if kind == "prompt_random":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=5)
    if kind == "prompt_text":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=6, prompt_tuning_init=PromptTuningInit.TEXT,
                                  prompt_tuning_init_text="Who are you? I am a model.", tokenizer_name_or_path=kw["tokenizer"])
    if kind == "ptuning":
        return PromptEncoderConfig(task_type=task, num_virtual_tokens=4, encoder_hidden_size=32)
    if kind == "prefix":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=3)
    if kind == "prefix_proj":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32)
    raise ValueError(kind)


def linear_paths(model, names) -> list[str]:
    """Full paths of the nn.Linear / Conv1D modules whose last name is in `names`. Given last names alone,
    PEFT >= 0.22 also turns gate_proj / up_proj / down_proj / gate into target_parameters on an MoE model's
    fused experts and router (transformers v4 → v5 conversion; test_expert_lora.py serves those); full paths
    target exactly the linears, on every PEFT version."""
    from transformers.pytorch_utils import Conv1D

    return sorted(n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and n.rsplit(".", 1)[-1] in set(names))


KINDS = ("lora", "lora_mlp", "rslora", "adalora", "adalora_pruned", "prompt_random", "prompt_text", "ptuning", "prefix", "prefix_proj")
MORE_KINDS = ("dora", "lora_bias", "lora_trained_bias", "lora_bias_all", "ia3", "lora_heads", "adalora_heads", "lora_embed", "lora_tokens",
              "tokens", "adaption")
"""LoRA variants and IA3; lora_bias, lora_trained_bias and lora_bias_all need a base whose linears have biases (Qwen2)."""


def save_adapter(model, kind: str, out: Path, seed: int = 0, scale: float = 0.3, **kw) -> Path:
    """Wrap `model` (consumed) with a PEFT adapter of `kind`, perturb every trainable weight with
    seeded noise (LoRA's B starts at zero, which would make it a no-op), save_pretrained to `out`."""
    if kind == "prompt_text" and "tokenizer" not in kw:
        kw["tokenizer"] = model.name_or_path
    if kind.startswith("adalora"):
        scale = max(scale, 1.0)  # three small factors (A, E, B): a bigger nudge for a clearly visible effect
    torch.manual_seed(seed)  # PEFT's own initialisation draws from the global RNG: same seed, same adapter
    peft = get_peft_model(model, _config(kind, model, **kw))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 and p.std() > 0 else 1))
    if kind == "adalora_pruned":
        _prune_adalora(peft, seed)
    peft.eval()
    peft.save_pretrained(out)
    return Path(out)


def _prune_adalora(peft, seed: int) -> None:
    """A few AdaLoRA training steps with rank allocation, so the saved checkpoint carries a
    rank_pattern and PEFT resizes (and drops to rank 0) modules exactly as in real training."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(3, 300, (2, 12), generator=gen)
    peft.train()
    for step in range(6):
        peft(input_ids=x, labels=x).loss.backward()
        opt.step()
        peft.base_model.update_and_allocate(step)
        opt.zero_grad()
    assert peft.peft_config["default"].rank_pattern, "rank allocation did not prune"


def save_adapters(checkpoint: Path, kinds: dict[str, str], root: Path) -> dict[str, Path]:
    """One adapter per name -> kind, each on a fresh fp32 copy of `checkpoint`, seeded by its order."""
    from transformers import AutoModelForCausalLM

    return {name: save_adapter(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), kind, root / name, seed=i)
            for i, (name, kind) in enumerate(kinds.items())}


def save_cls_adapter(checkpoint: Path, kind: str, out: Path, seed: int = 0, num_labels: int = 3,
                     id2label: dict[int, str] | None = None) -> Path:
    """A SEQ_CLS adapter of `kind` over AutoModelForSequenceClassification (its score head in
    modules_to_save, perturbed like every trainable weight); with `id2label`, the model's
    config.json is saved beside it, carrying the label names."""
    from transformers import AutoModelForSequenceClassification

    extra = {"id2label": id2label} if id2label is not None else {}
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32, num_labels=num_labels, **extra)
    save_adapter(model, kind, out, seed=seed, scale=1.0, task=TaskType.SEQ_CLS)
    if id2label is not None:
        model.config.save_pretrained(out)
    return Path(out)
