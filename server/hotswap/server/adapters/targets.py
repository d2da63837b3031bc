"""Do an adapter's config and its checkpoint name the same modules?

PEFT decides what an adapter changes from adapter_config.json, not from the checkpoint: at load it
wraps the modules the config targets, then copies the saved tensors in, and tensors of a module the
config does not target are dropped with only a warning (PeftModel.from_pretrained, "unexpected
keys"). hotswap serves the checkpoint's tensors, so the two agree only if every module with saved
LoRA / IA3 tensors is one the config targets; otherwise the adapter is refused at registration
instead of serving changes PEFT would not make. The match is PEFT's own function, so
target_modules (names, regex), exclude_modules, layers_to_transform / layers_pattern and
modules_to_save resolve exactly as PEFT resolves them."""
from __future__ import annotations

import re
from types import SimpleNamespace

from peft.tuners.tuners_utils import check_target_module_exists

from ..errors import AdapterIncompatible, InvalidArgument
from .weights import LoraWeights

_ALL_LINEAR = "all-linear"
"""PEFT's shorthand for every linear but the output head: each module hotswap can target."""


def check_targets(config: dict, weights: LoraWeights, embed_path: str) -> None:
    """Refuse modules whose saved tensors PEFT would ignore, naming the config fields that leave them out."""
    targets = config.get("target_modules")
    if targets is None or isinstance(targets, str) and targets.lower() == _ALL_LINEAR:
        return  # None: PEFT fills in its per-architecture defaults at load, which the saved tensors stand for
    if not isinstance(targets, (str, list)):
        raise AdapterIncompatible(f"target_modules must be a module name pattern or a list of names, got {targets!r:.80}",
                                  field="target_modules")
    spec = SimpleNamespace(target_modules=targets, target_parameters=None,
                           exclude_modules=config.get("exclude_modules"), modules_to_save=config.get("modules_to_save"),
                           layers_to_transform=config.get("layers_to_transform"), layers_pattern=config.get("layers_pattern"))
    saved = [name for name, m in weights.modules.items() if m.rank or m.in_scale is not None or m.out_scale is not None]
    if weights.tables is not None and weights.tables.embed_a is not None:
        saved.append(embed_path)
    try:
        ignored = [name for name in saved if not check_target_module_exists(spec, name)]
    except (TypeError, re.error) as e:  # a hand-edited config: a regex that does not compile, a number for a list
        raise InvalidArgument(f"target_modules / exclude_modules / layers_to_transform / layers_pattern cannot be matched "
                              f"against module names: {e}", field="target_modules") from None
    if ignored:
        fields = {k: config.get(k) for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
                  if config.get(k) is not None}
        raise AdapterIncompatible(
            f"the checkpoint has weights for {ignored[:3]}{' and %d more' % (len(ignored) - 3) if len(ignored) > 3 else ''}, "
            f"which adapter_config.json does not target ({', '.join(f'{k}={v!r:.80}' for k, v in fields.items())}): "
            "PEFT would load the adapter without them", field="target_modules")
