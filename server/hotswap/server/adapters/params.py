"""LoRA on parameters (LoraConfig.target_parameters) → ParamLoraWeights keyed "<module>.<parameter>".

PEFT wraps each targeted parameter in a lora.ParamWrapper; several on one module nest, one wrapper
per parameter in the module's registration order, the last one outermost (peft tuners_utils.py,
`_inject_parameters`). The checkpoint names only the wrapper's depth — "<module>.lora_A.weight" for
the outermost, "<module>.base_layer.lora_A.weight" for the one inside it, ... — so the parameter each
tensor belongs to is found by replaying that order against the config's target_parameters.

lora_A is [r·E, in] with expert e's rows at e·r .. e·r + r - 1; lora_B is [out, r·E] with expert e's
columns at e, E + e, 2E + e, ... (ParamWrapper.get_delta_weight reshapes B to (out, r, E)). Served:
the fused expert weights and router weights `model.experts` describes; anything else is refused."""
from __future__ import annotations

from typing import Callable

import torch
from packaging.version import InvalidVersion, Version

from ..errors import AdapterIncompatible, InvalidArgument
from .validate import BaseShape
from .weights import ParamLoraWeights

_WRAPPED = ".base_layer"
SWAP_LAYOUT_SINCE = Version("0.22.0")
"""The PEFT release whose lora_A / lora_B layout for (E, out, in) expert weights (transformers v5's
non-transposed experts; ParamWrapper._did_swap_in_out_features) hotswap was checked against."""
_FIELD = "target_parameters"


def _unwrap(module: str) -> tuple[str, int]:
    """("…experts", 2) for "…experts.base_layer.base_layer": the owning module and the wrapper's depth."""
    depth = 0
    while module.endswith(_WRAPPED):
        module, depth = module[: -len(_WRAPPED)], depth + 1
    return module, depth


def _targeted(key: str, names: list[str]) -> bool:
    """PEFT's match of a parameter against target_parameters: the full key or a dotted suffix of it."""
    return key in names or any(key.endswith(f".{n}") for n in names)


def _names(config: dict) -> list[str]:
    names = config.get(_FIELD) or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidArgument(f"must be a list of parameter names, got {names!r:.80}", field=_FIELD)
    if names:
        for option in ("use_dora", "lora_bias"):
            if config.get(option):
                raise AdapterIncompatible(f"{option} on target_parameters: PEFT's ParamWrapper has no such variant", field=_FIELD)
    return names


def _peft_version(config: dict) -> Version | None:
    try:
        return Version(str(config.get("peft_version", "")).split("@")[0])
    except InvalidVersion:
        return None


def param_weights(config: dict, parts: dict[str, dict[str, torch.Tensor]], shape: BaseShape,
                  scale: Callable[[dict, str, int], float]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, ParamLoraWeights]]:
    """Splits grouped checkpoint tensors (module path -> part -> tensor, as lora._group makes them) into
    those of linears, returned as they came, and the targeted parameters' weights. `scale(config, key, r)`
    gives alpha / r for a parameter key as for a module path (PEFT matches rank/alpha_pattern against it)."""
    names = _names(config)
    if not names:
        return parts, {}
    linears, owned = {}, {}
    for module, p in parts.items():
        owner, depth = _unwrap(module)
        if not depth and owner in shape.linears:
            linears[module] = p
        elif owner not in shape.params.owners:
            raise AdapterIncompatible(
                f"the checkpoint holds LoRA on parameters of {owner!r}: hotswap serves target_parameters on the fused "
                "expert weights of transformers' MoE experts modules (gate_up_proj / up_proj / down_proj) and on router "
                "weights its forward uses once as F.linear(x, weight), nothing else", field=_FIELD)
        else:
            owned.setdefault(owner, {})[depth] = p
    version = _peft_version(config)
    params = {}
    for owner, by_depth in owned.items():
        targeted = [n for n in shape.params.owners[owner] if _targeted(f"{owner}.{n}", names)]
        if sorted(by_depth) != list(range(len(targeted))):
            raise AdapterIncompatible(f"{owner!r}: the checkpoint wraps {len(by_depth)} of its parameters, target_parameters "
                                      f"{names!r:.120} name {targeted}", field=_FIELD)
        for depth, p in by_depth.items():
            key = f"{owner}.{targeted[len(targeted) - 1 - depth]}"  # the outermost wrapper holds the last parameter
            feats = shape.params.features.get(key)
            if feats is None:
                raise AdapterIncompatible(f"{key!r} is not a parameter hotswap serves LoRA on (fused expert weights and "
                                          "router weights only; not their biases)", field=_FIELD)
            if feats.out_first and (version is None or version < SWAP_LAYOUT_SINCE):
                raise AdapterIncompatible(f"{key!r} is stored (experts, out, in); hotswap serves LoRA on such weights as PEFT >= "
                                          f"{SWAP_LAYOUT_SINCE} saves it, this adapter says peft_version "
                                          f"{config.get('peft_version')!r}", field=_FIELD)
            params[key] = _param(key, p, feats.experts, feats.in_features, feats.out_features, config, scale)
    return linears, params


def _param(key: str, p: dict[str, torch.Tensor], experts: int, fan_in: int, fan_out: int, config: dict,
           scale: Callable[[dict, str, int], float]) -> ParamLoraWeights:
    if set(p) != {"lora_A", "lora_B"}:
        raise AdapterIncompatible(f"{key!r}: expected lora_A and lora_B weights, the checkpoint has {sorted(p)}", field=_FIELD)
    a, b = p["lora_A"], p["lora_B"]  # [r·E, in], [out, r·E]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] % experts or a.shape[0] != b.shape[1] \
            or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] == 0:
        raise AdapterIncompatible(f"{key!r} is {experts} expert(s) of {fan_in}→{fan_out} in the base model, the adapter's "
                                  f"lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)}", field=_FIELD)
    r = a.shape[0] // experts
    return ParamLoraWeights(a.float().reshape(experts, r, fan_in),  # [E, r, in]
                            b.float().reshape(fan_out, r, experts).permute(2, 0, 1).contiguous(),  # [E, out, r]
                            scale(config, key, r))
