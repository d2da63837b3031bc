"""IA3 checkpoints → LoraWeights with no low-rank part, only per-linear scaling vectors.

PEFT's IA3 multiplies a feedforward module's input by l (ia3_l saved [1, in]) and any other
module's output, bias included, by l (saved [out, 1]) (peft/tuners/ia3/layer.py). The saved
shape says which; the engine applies either per token through the same slots as LoRA."""
from __future__ import annotations

import re

import torch

from ..errors import AdapterIncompatible
from .validate import BaseShape
from .weights import LoraModuleWeights, LoraWeights

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.ia3_l(\.weight)?$")


def ia3_weights(config: dict, tensors: dict[str, torch.Tensor], shape: BaseShape) -> LoraWeights:
    if config.get("fan_in_fan_out"):
        raise AdapterIncompatible("fan_in_fan_out (Conv1D targets) is not supported for IA3", field="fan_in_fan_out")
    modules = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterIncompatible(f"unexpected tensor {key!r} in an IA3 checkpoint (only linear targets are supported)",
                                      field="target_modules")
        name = m["module"]
        if name not in shape.linears:
            raise AdapterIncompatible(f"IA3 target {name!r} is absent from the base model (or not linear)", field="target_modules")
        fan_in, fan_out = shape.linears[name]
        feedforward = tuple(t.shape) == (1, fan_in) and (fan_in != 1 or fan_out == 1 and _is_feedforward(config, name))
        if not feedforward and tuple(t.shape) != (fan_out, 1):
            raise AdapterIncompatible(f"IA3 vector of {name!r} has shape {tuple(t.shape)}; the linear is {fan_in}→{fan_out} "
                                      f"(expected (1, {fan_in}) for a feedforward module or ({fan_out}, 1))", field="feedforward_modules")
        vec = t.float().flatten()
        modules[name] = LoraModuleWeights(torch.zeros(0, fan_in), torch.zeros(fan_out, 0), 1.0,
                                          in_scale=vec if feedforward else None, out_scale=None if feedforward else vec)
    return LoraWeights(modules)


def _is_feedforward(config: dict, module: str) -> bool:
    """PEFT's rule for a module both shapes fit (a 1→1 linear): a string is a full-match regex, a list matches name tails."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module == f or module.endswith("." + f) for f in ff)
