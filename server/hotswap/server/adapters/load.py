"""PEFT adapter folder → validated `Adapter` with host (CPU, fp32) weights (the cache keeps them in the serving dtype)."""
from __future__ import annotations

import math

from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterIncompatible, InvalidArgument
from .config_check import check_config, check_scale
from .adaption import adaption_weights
from .ia3 import ia3_weights
from .lora import adalora_weights, lora_weights
from .peft_files import read_adapter_dir
from .prefix import prefix_weights
from .prompt import prompt_weights
from .score_head import split_score_head
from .validate import BaseShape, check_prefix_config, check_weights
from .token_tables import split as token_split
from .token_tables import token_tables
from .targets import check_targets
from .weights import Adapter, LoraWeights

SUPPORTED = ("LORA", "ADALORA", "IA3", "TRAINABLE_TOKENS", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT")
TASKS = ("CAUSAL_LM", "SEQ_CLS")
"""CAUSAL_LM adapters serve Generate and Score; SEQ_CLS adapters (with their score head) serve Classify."""


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in t: its minimum and maximum in one pass (a NaN anywhere makes both NaN), with no
    temporary; isfinite(t).all() took ~8x as long on an adapter's 120 small tensors (~4 of ~10 ms a load)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def load_adapter(path: Path, adapter_id: str, base: nn.Module | BaseShape, max_lora_rank: int,
                 shape: BaseShape | None = None) -> Adapter:
    """`base`: the loaded model (its weights are read by adapters tied to them) or only its shape;
    `shape`: the shape to check against when it differs from what the config states."""
    shape = shape or (base if isinstance(base, BaseShape) else BaseShape.of(base))
    config, tensors = read_adapter_dir(Path(path))
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED:
        raise AdapterIncompatible(f"unknown or unsupported peft_type {config.get('peft_type')!r}; hotswap serves {', '.join(SUPPORTED)}", field="peft_type")
    check_config(config, peft_type)
    task = config.get("task_type")
    if task not in (None, *TASKS):
        raise AdapterIncompatible(f"task_type {task!r}: hotswap serves {' and '.join(TASKS)} adapters", field="task_type")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not _finite(t)]
    if bad:
        raise InvalidArgument(f"adapter weights contain NaN or inf (tensor {bad[0]!r})", field="path")
    head, saved = None, config
    if task == "SEQ_CLS":  # the head is served apart; the rest loads like any adapter of its type
        config, tensors, head = split_score_head(config, tensors, shape.hidden_size, Path(path))
    if peft_type in ("LORA", "ADALORA", "IA3", "TRAINABLE_TOKENS"):  # these may also change the embedding / output head
        config = _check_modules_to_save(config, tensors, shape)
        tensors, parts = token_split(tensors, shape)
        tables = token_tables(config, parts, shape, None if isinstance(base, BaseShape) else base.get_input_embeddings().weight)
        if peft_type == "TRAINABLE_TOKENS":
            if tensors:
                raise AdapterIncompatible(f"unexpected tensor {next(iter(tensors))!r} in a trainable-tokens checkpoint", field="target_modules")
            weights = LoraWeights({})
        else:
            weights = {"LORA": lora_weights, "ADALORA": adalora_weights, "IA3": ia3_weights}[peft_type](config, tensors, shape)
        weights.tables = tables
    elif peft_type == "ADAPTION_PROMPT":
        weights = adaption_weights(config, tensors, shape, None if isinstance(base, BaseShape) else base)
    elif peft_type in ("PROMPT_TUNING", "P_TUNING"):
        if config.get("token_dim") not in (None, shape.hidden_size):
            raise AdapterIncompatible(f"hidden size: adapter token_dim {config['token_dim']}, base model hidden size {shape.hidden_size}", field="hidden_size")
        weights = prompt_weights(config, tensors)
    else:
        check_prefix_config(config, shape)
        weights = prefix_weights(config, tensors, shape.num_kv_heads, shape.head_dim)
    for module, w in getattr(weights, "modules", {}).items():
        check_scale(module, w.scale)
    check_weights(weights, shape, max_lora_rank)
    if peft_type in ("LORA", "ADALORA", "IA3"):  # after check_weights: a module the base lacks is named as such first
        check_targets(config, weights, shape.embed_path)
    return Adapter(adapter_id, peft_type, weights, saved, head)


def _check_modules_to_save(config: dict, tensors: dict[str, torch.Tensor], shape: BaseShape) -> dict:
    """The config without modules_to_save names the checkpoint holds no tensor for: PEFT wraps only modules
    the model has and saves each one it wraps, so such a name matched nothing and changes nothing (PEFT 0.22
    adds "pre_classifier" to every classifier's list, which decoder-only models lack). Fully trained copies
    are served for the input embedding and the output head only."""
    names = config.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidArgument(f"must be a list of module names, got {names!r:.80}", field="modules_to_save")
    held = [k.rsplit(".", 1)[0] for k in tensors]  # module paths; PEFT matches a name as a plain suffix of one
    names = [n for n in names if any(m.endswith(n) for m in held)]
    ends = {p.rsplit(".", 1)[-1] for p in (shape.embed_path, shape.head_path) if p}
    other = [n for n in names if n.rsplit(".", 1)[-1] not in ends]
    if other:
        raise AdapterIncompatible(f"modules_to_save {other[:3]}: hotswap serves fully trained copies of the input embedding and "
                                  f"output head ({', '.join(sorted(ends))}) only", field="modules_to_save")
    return {**config, "modules_to_save": names or None}
