"""LoRA-family checkpoints (LORA incl. DoRA and lora_bias, ADALORA) → LoraWeights keyed by base module path."""
from __future__ import annotations

import math
import re

import torch

from ..errors import AdapterIncompatible
from .weights import LoraModuleWeights, LoraWeights

# PEFT names tensors "base_model.model.<module path>.lora_A.weight" (no adapter name when saved).
# DoRA's magnitude is saved as "<module path>.lora_magnitude_vector"; lora_B's bias (lora_bias) as "lora_B.bias".
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_E|lora_magnitude_vector)(\.(?P<kind>weight|bias))?$")

# LoraConfig options that change the math in ways these weights do not express. (fan_in_fan_out is not
# one: it only transposes the delta PEFT merges into a Conv1D weight; see model/linears.py.)
_UNSUPPORTED = {
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


def module_scale(config: dict, module: str, r: int) -> float:
    """alpha / r (alpha / sqrt(r) for rsLoRA), alpha from alpha_pattern where one matches."""
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return float(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


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
        part = m["part"] + (".bias" if m["kind"] == "bias" else "")
        parts.setdefault(m["module"], {})[part] = t
    return parts


def lora_weights(config: dict, tensors: dict[str, torch.Tensor]) -> LoraWeights:
    _check_options(config)
    modules = {}
    for module, p in _group(tensors).items():
        if "lora_A" not in p or "lora_B" not in p:
            raise AdapterIncompatible(f"module {module!r} has only {sorted(p)}", field="target_modules")
        scale = module_scale(config, module, p["lora_A"].shape[0])
        modules[module] = LoraModuleWeights(p["lora_A"].float(), p["lora_B"].float(), float(scale),
                                            bias=_extra(p, "lora_B.bias", config, "lora_bias", module),
                                            magnitude=_extra(p, "lora_magnitude_vector", config, "use_dora", module))
    return LoraWeights(modules)


def _extra(parts: dict[str, torch.Tensor], part: str, config: dict, option: str, module: str) -> torch.Tensor | None:
    """A per-output vector the config's `option` promises (DoRA magnitude, lora_B bias): present
    exactly when the option is on, else the checkpoint and its config disagree."""
    t = parts.get(part)
    if bool(config.get(option)) != (t is not None):
        state = "on" if config.get(option) else "off"
        raise AdapterIncompatible(f"{option} is {state} but module {module!r} {'lacks' if t is None else 'has'} a {part} tensor", field=option)
    if t is not None and t.dim() != 1:
        raise AdapterIncompatible(f"module {module!r}: {part} must be a vector, got shape {tuple(t.shape)}", field=option)
    return None if t is None else t.float()


def adalora_weights(config: dict, tensors: dict[str, torch.Tensor]) -> LoraWeights:
    """AdaLoRA computes x (A*E)^T B^T * scaling / (ranknum + 1e-5), scaling = lora_alpha (or r when
    alpha is 0) and ranknum the initial rank, kept even after rank_pattern pruning (peft adalora/layer.py)."""
    _check_options(config)
    for option in ("use_dora", "lora_bias"):
        if config.get(option):
            raise AdapterIncompatible(f"{option} is not an AdaLoRA option", field=option)
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
