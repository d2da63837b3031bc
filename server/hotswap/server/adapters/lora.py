"""LoRA-family checkpoints (LORA, ADALORA) → LoraWeights keyed by base module path."""
from __future__ import annotations

import math
import re

import torch

from ..errors import AdapterIncompatible
from .weights import LoraModuleWeights, LoraWeights

# PEFT names tensors "base_model.model.<module path>.lora_A.weight" (no adapter name when saved).
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_E)(\.weight)?$")

# LoraConfig options that change the math in ways these weights do not express. (fan_in_fan_out is not
# one: it only transposes the delta PEFT merges into a Conv1D weight; see model/linears.py.)
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "modules_to_save": "modules_to_save (fully trained modules)",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: a pattern matches the module path's tail at a dot boundary."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_options(config: dict) -> None:
    for option, label in _UNSUPPORTED.items():
        if config.get(option):
            raise AdapterIncompatible(f"{label} is not supported by hotswap's LoRA kernels", field=option)


def _group(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterIncompatible(
                f"unexpected tensor {key!r} in a LoRA checkpoint (embedding or conv LoRA targets are not supported)",
                field="target_modules",
            )
        parts.setdefault(m["module"], {})[m["part"]] = t
    return parts


def lora_weights(config: dict, tensors: dict[str, torch.Tensor]) -> LoraWeights:
    _check_options(config)
    modules = {}
    for module, p in _group(tensors).items():
        if "lora_A" not in p or "lora_B" not in p:
            raise AdapterIncompatible(f"module {module!r} has only {sorted(p)}", field="target_modules")
        r = p["lora_A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = LoraModuleWeights(p["lora_A"].float(), p["lora_B"].float(), float(scale))
    return LoraWeights(modules)


def adalora_weights(config: dict, tensors: dict[str, torch.Tensor]) -> LoraWeights:
    """AdaLoRA computes x (A*E)^T B^T * scaling / (ranknum + 1e-5), scaling = lora_alpha (or r when
    alpha is 0) and ranknum the initial rank, kept even after rank_pattern pruning (peft adalora/layer.py)."""
    _check_options(config)
    init_r = config.get("init_r", 12)
    alpha = config.get("lora_alpha", 8)
    scale = (alpha if alpha > 0 else float(init_r)) / (float(init_r) + 1e-5)
    modules = {}
    for module, p in _group(tensors).items():
        if p["lora_A"].shape[0] == 0:
            continue  # pruned to rank 0
        a = (p["lora_A"] * p["lora_E"]).float()  # E is (r, 1): one singular value per rank
        modules[module] = LoraModuleWeights(a, p["lora_B"].float(), scale)
    return LoraWeights(modules)
