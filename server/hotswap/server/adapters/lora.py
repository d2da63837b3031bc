"""LoRA-family checkpoints (LORA incl. DoRA and lora_bias, ADALORA) → LoraWeights keyed by base module path."""
from __future__ import annotations

import dataclasses
import math
import re
from functools import cache

import torch
from peft import LoraConfig

from ..errors import AdapterIncompatible
from .params import param_weights
from .validate import BaseShape
from .weights import LoraModuleWeights, LoraWeights

# PEFT names tensors "base_model.model.<module path>.lora_A.weight" (no adapter name when saved).
# DoRA's magnitude is saved as "<module path>.lora_magnitude_vector"; lora_B's bias (lora_bias) as "lora_B.bias".
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_E|lora_magnitude_vector)(\.(?P<kind>weight|bias))?$")
# bias="lora_only" / "all" also trains base biases: "<module>.base_layer.bias" on a LoRA target, "<module>.bias" elsewhere.
_BIAS = re.compile(r"^base_model\.model\.(?P<module>.+?)(\.base_layer)?\.bias$")

# LoraConfig options that change the math in ways these weights do not express. (fan_in_fan_out is not
# one: it only transposes the delta PEFT merges into a Conv1D weight; see model/linears.py.) The LoRA
# variants PEFT selects from config fields (LoraLayer.lora_variants) are all here but DoRA.
_UNSUPPORTED = {
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "layer_replication": "layer replication (layer_replication: PEFT builds extra layers sharing base weights)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config: PEFT truncates the base weight's singular values when it loads the adapter)",
}
# init_lora_weights values after which PeftModel.from_pretrained runs the base model unchanged. PiSSA,
# OLoRA, CorDA, LoftQ and (PEFT 0.22) ASTRA subtract their initial delta from (or requantize) the base
# weight again at load (peft/tuners/lora/layer.py, update_layer), so the saved A/B only fit that modified
# base. NoRA (0.22) only normalises A's initial columns. A value not listed here is refused.
_BASE_PRESERVING_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica", "lora_ga", "nora")
_BIAS_MODES = ("none", "all", "lora_only")


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


@cache
def _variant_fields() -> frozenset[str]:
    """LoraConfig fields the installed PEFT marks as selecting a LoRA variant (a forward of its own)."""
    return frozenset(f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant"))


def _check_options(config: dict) -> None:
    for option, label in _UNSUPPORTED.items():
        if config.get(option):
            raise AdapterIncompatible(f"{label} is not supported by hotswap's LoRA kernels", field=option)
    for option in sorted(_variant_fields() - {"use_dora"}):  # one a later PEFT adds, before it is listed above
        if config.get(option):
            raise AdapterIncompatible(f"the LoRA variant {option} is not supported by hotswap's LoRA kernels", field=option)
    init = config.get("init_lora_weights", True)
    if not any(init is v or (isinstance(init, str) and init == v) for v in _BASE_PRESERVING_INITS):
        raise AdapterIncompatible(
            f"init_lora_weights {init!r}: PEFT rewrites the base weights when it loads such an adapter, which hotswap's shared "
            f"base cannot do; save it converted to plain LoRA (save_pretrained(path_initial_model_for_weight_conversion=...))",
            field="init_lora_weights")
    if config.get("bias", "none") not in _BIAS_MODES:
        raise AdapterIncompatible(f"bias must be one of {_BIAS_MODES}, got {config.get('bias')!r}", field="bias")


def _group(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is not None:
            parts.setdefault(m["module"], {})[m["part"] + (".bias" if m["kind"] == "bias" else "")] = t
        elif (m := _BIAS.match(key)) is not None:
            parts.setdefault(m["module"], {})["base_bias"] = t
        else:
            raise AdapterIncompatible(
                f"unexpected tensor {key!r} in a LoRA checkpoint: not a lora_A / lora_B / lora_E / lora_magnitude_vector or bias "
                f"tensor of a linear layer (LoRA variants that save other tensors, and conv targets, are not supported)",
                field="target_modules",
            )
    return parts


def _base_bias(parts: dict[str, torch.Tensor], config: dict, module: str, shape: BaseShape) -> torch.Tensor | None:
    """The trained bias of `module` (bias="lora_only" / "all") that replaces the base linear's own, or None."""
    t = parts.get("base_bias")
    if t is None:
        return None
    if config.get("bias", "none") == "none":
        raise AdapterIncompatible(f"bias is 'none' but the checkpoint has a trained bias for {module!r}", field="bias")
    if module not in shape.linears:
        raise AdapterIncompatible(f"bias={config.get('bias')!r} trained the bias of {module!r}, which is not a linear layer of the "
                                  "base model; hotswap serves trained biases of linear layers only", field="bias")
    fan_out = shape.linears[module][1]
    if tuple(t.shape) != (fan_out,):
        raise AdapterIncompatible(f"trained bias of {module!r} has shape {tuple(t.shape)}, the linear needs ({fan_out},)", field="bias")
    return t.float()


def lora_weights(config: dict, tensors: dict[str, torch.Tensor], shape: BaseShape) -> LoraWeights:
    _check_options(config)
    parts, params = param_weights(config, _group(tensors), shape, module_scale)
    modules = {}
    for module, p in parts.items():
        base_bias = _base_bias(p, config, module, shape)
        if set(p) == {"base_bias"}:  # bias="all": a linear the LoRA does not target
            modules[module] = _bias_only(module, base_bias, shape)
            continue
        if "lora_A" not in p or "lora_B" not in p:
            raise AdapterIncompatible(f"module {module!r} has only {sorted(p)}", field="target_modules")
        scale = module_scale(config, module, p["lora_A"].shape[0])
        modules[module] = LoraModuleWeights(p["lora_A"].float(), p["lora_B"].float(), float(scale),
                                            bias=_extra(p, "lora_B.bias", config, "lora_bias", module),
                                            magnitude=_extra(p, "lora_magnitude_vector", config, "use_dora", module),
                                            base_bias=base_bias)
    return LoraWeights(modules, params=params)


def _bias_only(module: str, base_bias: torch.Tensor, shape: BaseShape) -> LoraModuleWeights:
    fan_in, fan_out = shape.linears[module]
    return LoraModuleWeights(torch.zeros(0, fan_in), torch.zeros(fan_out, 0), 1.0, base_bias=base_bias)


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


def adalora_weights(config: dict, tensors: dict[str, torch.Tensor], shape: BaseShape) -> LoraWeights:
    """AdaLoRA computes x (A*E)^T B^T * scaling / (ranknum + 1e-5), scaling = lora_alpha (or r when
    alpha is 0) and ranknum the initial rank, kept even after rank_pattern pruning (peft adalora/layer.py)."""
    _check_options(config)
    for option in ("use_dora", "lora_bias", "target_parameters"):
        if config.get(option):
            raise AdapterIncompatible(f"{option} is not an AdaLoRA option", field=option)
    init_r = config.get("init_r", 12)
    alpha = config.get("lora_alpha", 8)
    scale = (alpha if alpha > 0 else float(init_r)) / (float(init_r) + 1e-5)
    modules = {}
    for module, p in _group(tensors).items():
        base_bias = _base_bias(p, config, module, shape)
        if set(p) == {"base_bias"}:  # bias="all": a linear the adapter does not target
            modules[module] = _bias_only(module, base_bias, shape)
            continue
        if not {"lora_A", "lora_B", "lora_E"} <= set(p):
            raise AdapterIncompatible(f"module {module!r} has only {sorted(p)}", field="target_modules")
        if p["lora_A"].shape[0] == 0:  # pruned to rank 0
            if base_bias is not None:
                modules[module] = _bias_only(module, base_bias, shape)
            continue
        a = (p["lora_A"] * p["lora_E"]).float()  # E is (r, 1): one singular value per rank
        modules[module] = LoraModuleWeights(a, p["lora_B"].float(), scale, base_bias=base_bias)
    return LoraWeights(modules)
