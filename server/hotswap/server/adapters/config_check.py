"""The fields of an adapter_config.json that change the served math, checked for type and
range before any weight is read: a hand-edited or hostile config is refused at registration
with the field it got wrong, instead of failing inside the engine."""
from __future__ import annotations

import math
import re

from ..errors import InvalidArgument, shown

MAX_SCALE = 1e4
"""|alpha / r| past this cannot be a trained adapter: it would swamp the base output."""


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _patterns(config: dict, name: str, ok, what: str) -> None:
    patterns = config.get(name)
    if patterns in (None, {}):
        return
    if not isinstance(patterns, dict):
        raise InvalidArgument(f"must be an object of module pattern → {what}, got {shown(patterns, 80)}", field=name)
    for key, value in patterns.items():
        try:
            re.compile(key)
        except (re.error, TypeError) as e:
            raise InvalidArgument(f"pattern {shown(key, 80)} is not a regular expression: {e}", field=name) from None
        if not ok(value):
            raise InvalidArgument(f"pattern {shown(key, 80)}: must be {what}, got {shown(value, 80)}", field=name)


def check_config(config: dict, peft_type: str) -> None:
    if peft_type in ("LORA", "ADALORA"):
        for name in ("r", "init_r", "target_r"):
            if name in config and config[name] is not None and not _count(config[name]):
                raise InvalidArgument(f"must be a whole number >= 1, got {shown(config[name], 80)}", field=name)
        alpha = config.get("lora_alpha")
        if alpha is not None and not (_number(alpha) and (alpha > 0 or (alpha == 0 and peft_type == "ADALORA"))):  # AdaLoRA reads 0 as "use r"
            raise InvalidArgument(f"must be a finite number > 0, got {shown(alpha, 80)}", field="lora_alpha")
        _patterns(config, "alpha_pattern", lambda v: _number(v) and v > 0, "a finite number > 0")
        if peft_type == "ADALORA":  # AdaLoRA keeps each module's pruning mask here
            _patterns(config, "rank_pattern", lambda v: isinstance(v, list) and all(isinstance(b, bool) for b in v), "a list of true/false")
        else:
            _patterns(config, "rank_pattern", _count, "a whole number >= 1")
        for name in ("use_rslora", "use_dora", "lora_bias"):
            if not isinstance(config.get(name, False), bool):
                raise InvalidArgument(f"must be true or false, got {shown(config[name], 80)}", field=name)
        if config.get("use_dora") and config.get("lora_bias"):  # PEFT refuses this pair too (peft/tuners/lora/config.py)
            raise InvalidArgument("lora_bias cannot be combined with DoRA (use_dora)", field="lora_bias")
    elif peft_type == "IA3":
        ff = config.get("feedforward_modules")
        if ff is not None and not isinstance(ff, str) and not (isinstance(ff, list) and all(isinstance(f, str) for f in ff)):
            raise InvalidArgument(f"must be a module name pattern or a list of names, got {shown(ff, 80)}", field="feedforward_modules")
    elif peft_type == "ADAPTION_PROMPT":
        for name in ("adapter_len", "adapter_layers"):
            if config.get(name) is not None and not _count(config[name]):
                raise InvalidArgument(f"must be a whole number >= 1, got {shown(config[name], 80)}", field=name)
    else:
        n = config.get("num_virtual_tokens")
        if n is not None and not _count(n):
            raise InvalidArgument(f"must be a whole number >= 1, got {shown(n, 80)}", field="num_virtual_tokens")


def check_scale(module: str, scale: float) -> None:
    if not (math.isfinite(scale) and abs(scale) <= MAX_SCALE):
        raise InvalidArgument(f"module {shown(module, 120)}: LoRA scale (alpha / r) is {scale}; at most {MAX_SCALE:g}", field="lora_alpha")
