"""The parameters a LoRA may target directly (PEFT's `target_parameters`, lora.ParamWrapper) that
the engine can serve exactly, and their (experts, in, out) features.

Two kinds:
- **fused MoE experts**: modules of a class transformers decorates with `use_experts_implementation`
  (Qwen2-MoE, OLMoE, Mixtral, DeepSeek, GPT-OSS ...), whose `gate_up_proj` (or `up_proj`) and
  `down_proj` hold every expert's weight in one 3-D parameter, (E, out, in) or, `is_transposed`,
  (E, in, out). The decorator's flags (has_gate, has_bias, is_transposed, _apply_gate) describe the
  math fully, so the engine runs its own forward of it (engine/expert_lora.py).
- **routers**: any other module (not a linear) whose forward uses its 2-D `weight` exactly once, as
  F.linear(x, weight), the weight maybe cast to another float dtype first: PEFT's delta on that weight
  is then a LoRA delta on that one product's output, whatever the router does after (softmax, sigmoid,
  top-k, a bias). Found by running each candidate
  once on zeros and watching every torch call that receives the weight (`WeightUses`).

Anything else a target_parameters adapter names (an experts class transformers does not describe,
bias parameters, a weight used twice or in any other call) is refused at registration."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .linears import linear_features

EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
"""The fused expert weights transformers' experts forward reads (gate_up_proj when has_gate, else up_proj)."""
_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")


@dataclass(frozen=True)
class ParamFeatures:
    experts: int
    """Leading expert axis of a 3-D weight; 1 for a router's 2-D weight."""
    in_features: int
    out_features: int
    out_first: bool = False
    """A 3-D weight stored (E, out, in), not is_transposed's (E, in, out): PEFT swaps its in/out features."""


def is_experts(module: nn.Module) -> bool:
    """A fused-experts module whose layout transformers' use_experts_implementation describes."""
    return all(isinstance(getattr(module, f, None), bool) for f in _FLAGS) and callable(getattr(module, "_apply_gate", None)) \
        and isinstance(getattr(module, "down_proj", None), nn.Parameter)


def expert_weight_features(module: nn.Module, name: str) -> ParamFeatures | None:
    """(E, in, out) of a fused expert weight the module's forward reads; None for any other parameter."""
    wanted = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    if name not in wanted:
        return None
    p = getattr(module, name, None)
    if not isinstance(p, nn.Parameter) or p.dim() != 3:
        return None
    e, a, b = p.shape
    return ParamFeatures(e, a, b) if module.is_transposed else ParamFeatures(e, b, a, out_first=True)


_CASTS = (torch.Tensor.type, torch.Tensor.to, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16)


class WeightWatch(TorchFunctionMode):
    """Sees, during a forward, each torch call that receives `weight` or a cast of it (DeepSeek-style
    routers compute F.linear(x.float(), weight.float()) in a bf16 model): F.linear(x, weight or its cast)
    goes to `on_linear`, any other call to `on_other`. A cast keeps the weight's values up to rounding,
    and PEFT adds its delta before the cast, so a delta added to that product's output is the same change
    (exact where the cast is a no-op, as in fp32). Reading an attribute (its dtype, its shape) is no use."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.casts = weight, []

    def _is_weight(self, t: object) -> bool:
        return t is self.weight or any(t is c for c in self.casts)

    def on_linear(self, x: torch.Tensor, out: torch.Tensor) -> None: ...

    def on_other(self) -> None: ...

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._is_weight(out) or getattr(func, "__name__", "") == "__get__":
            return out  # a no-op cast, or an attribute read
        if func is F.linear and len(args) > 1 and self._is_weight(args[1]):
            self.on_linear(args[0], out)
        elif func in _CASTS and args and self._is_weight(args[0]) and isinstance(out, torch.Tensor) \
                and out.is_floating_point() and out.shape == self.weight.shape:
            self.casts.append(out)
        elif any(self._is_weight(t) for t in tree_leaves((args, kwargs))):
            self.on_other()
        return out


class WeightUses(WeightWatch):
    """Counts the weight's uses in one forward: `linear` as F.linear(x, weight[, bias]), `other` any other."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.linear, self.other = 0, 0

    def on_linear(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.linear += 1

    def on_other(self) -> None:
        self.other += 1


def _router_features(module: nn.Module) -> ParamFeatures | None:
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 2 or linear_features(module) is not None or isinstance(module, nn.Embedding):
        return None
    uses, x = WeightUses(w), torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device)
    try:
        with torch.no_grad(), uses:
            module(x)
    except Exception:  # noqa: BLE001 - a module this call cannot run is no router the engine knows
        return None
    return ParamFeatures(1, w.shape[1], w.shape[0]) if (uses.linear, uses.other) == (1, 0) else None


@dataclass(frozen=True)
class ParamTargets:
    """What `target_parameters` may name in one model."""

    features: dict[str, ParamFeatures]
    """"<module path>.<parameter>" -> features, of every servable parameter."""
    owners: dict[str, tuple[str, ...]]
    """Module path -> all its own parameter names in registration order (PEFT nests one ParamWrapper per
    targeted parameter in this order, so the saved "base_layer" depth names the parameter), for every
    module owning a servable parameter."""


def param_targets(model: nn.Module) -> ParamTargets:
    features, owners = {}, {}
    for path, module in model.named_modules():
        if is_experts(module):
            found = {n: f for n in EXPERT_WEIGHTS if (f := expert_weight_features(module, n)) is not None}
        else:
            f = _router_features(module)
            found = {"weight": f} if f is not None else {}
        if found:
            owners[path] = tuple(n for n, _ in module.named_parameters(recurse=False))
            features.update({f"{path}.{n}": f for n, f in found.items()})
    return ParamTargets(features, owners)
