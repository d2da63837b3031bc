"""The modules a LoRA adapter may target, and their (in, out) features.

Two kinds compute y = x W + b: `nn.Linear` (bitsandbytes' Linear4bit / Linear8bitLt
subclass it) with weight [out, in], and transformers' `Conv1D` (GPT-2, GPT-BigCode
style) with weight [in, out]. PEFT's LoRA A/B are ordinary linears either way
(A: in → r, B: r → out); its `fan_in_fan_out` flag only transposes the delta when
merging into a Conv1D weight, so the unmerged forward — what the engine runs — is
the same for both (peft tuners/lora/layer.py, `Linear.forward` vs `get_delta_weight`)."""
from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a LoRA-targetable module, None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]  # weight [in, out]
    return None


def lora_targetable(model: nn.Module) -> dict[str, nn.Module]:
    """Every module `linear_features` knows, by module path, except the output head."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if m is not head and linear_features(m) is not None}
