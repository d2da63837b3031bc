"""LLaMA-Adapter checkpoints (PEFT ADAPTION_PROMPT) → AdaptionWeights.

PEFT saves "<layer>.self_attn.adaption_prompt" [1, adapter_len, hidden] and
"<layer>.self_attn.adaption_gate" [1] for each of the top `adapter_layers` layers. Its
query states are the rotary-embedded q_proj outputs and the prompt's keys have no rotary
(peft/tuners/adaption_prompt/utils.py): exact for the model types PEFT lists with
`llama_compute_query_states` (Llama, Mistral), and only when o_proj has no bias (PEFT
applies o_proj to the adapter output separately, adding its bias twice)."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import AdapterIncompatible
from .validate import BaseShape
from .weights import AdaptionWeights

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+\.layers\.(?P<layer>\d+)\.self_attn)\.(?P<part>adaption_prompt|adaption_gate)$")
MODEL_TYPES = ("llama", "mistral")
"""Architectures whose query states PEFT computes the way transformers' attention does."""


def adaption_weights(config: dict, tensors: dict[str, torch.Tensor], shape: BaseShape, model: nn.Module | None) -> AdaptionWeights:
    if config.get("target_modules", "self_attn") != "self_attn":
        raise AdapterIncompatible(f"adaption prompts in {config.get('target_modules')!r}: only self_attn is supported", field="target_modules")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model is not None and model_type not in MODEL_TYPES:
        raise AdapterIncompatible(f"LLaMA-Adapter (adaption prompts) serves on {', '.join(MODEL_TYPES)} models (PEFT's own list), "
                                  f"not {model_type!r}", field="peft_type")
    parts: dict[int, dict[str, torch.Tensor]] = {}
    paths: dict[int, str] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterIncompatible(f"unexpected tensor {key!r} in an adaption-prompt checkpoint", field="target_modules")
        layer = int(m["layer"])
        parts.setdefault(layer, {})[m["part"]] = t
        paths[layer] = m["module"]
    layers = sorted(parts)
    n = config.get("adapter_layers")
    if not layers or layers != list(range(shape.num_layers - len(layers), shape.num_layers)) or (n is not None and n != len(layers)):
        raise AdapterIncompatible(f"adaption prompts on layers {layers}; adapter_layers {n} must be the top layers of the base's "
                                  f"{shape.num_layers}", field="adapter_layers")
    prompts, gates = [], []
    for layer in layers:
        p, g = parts[layer].get("adaption_prompt"), parts[layer].get("adaption_gate")
        length = config.get("adapter_len") or (p.shape[1] if p is not None and p.dim() == 3 else 0)
        if p is None or g is None or tuple(p.shape) != (1, length, shape.hidden_size) or g.numel() != 1:
            raise AdapterIncompatible(f"layer {layer}: adaption_prompt must be (1, adapter_len {length}, hidden {shape.hidden_size}) "
                                      f"and adaption_gate one number, got {None if p is None else tuple(p.shape)} / "
                                      f"{None if g is None else tuple(g.shape)}", field="adapter_len")
        if model is not None and getattr(model.get_submodule(paths[layer]).o_proj, "bias", None) is not None:
            raise AdapterIncompatible("adaption prompts on a base whose o_proj has a bias are not supported", field="peft_type")
        prompts.append(p[0].float())
        gates.append(g.reshape(()).float())
    return AdaptionWeights([paths[i] for i in layers], layers, torch.stack(prompts), torch.stack(gates))
