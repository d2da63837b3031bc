"""Does an adapter fit the loaded base model? Each check names the mismatch and both values."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ..errors import AdapterIncompatible
from ..model.experts import ParamTargets, param_targets
from ..model.linears import linear_features, lora_targetable
from .weights import LoraWeights, PrefixWeights, PromptWeights


@dataclass(frozen=True)
class BaseShape:
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    linears: dict[str, tuple[int, int]]
    """module path -> (in_features, out_features) of every LoRA-targetable module (nn.Linear, Conv1D) except the output head."""
    embed_path: str = ""
    """Module path of the input embedding, e.g. "model.embed_tokens"."""
    head_path: str = ""
    """Module path of the output head, e.g. "lm_head"."""
    vocab_size: int = 0
    tied: bool = False
    """The output head shares the input embedding's weight."""
    params: ParamTargets = field(default_factory=lambda: ParamTargets({}, {}))
    """Parameters LoRA may target directly (target_parameters): fused MoE expert weights and router weights."""

    @classmethod
    def of(cls, model: nn.Module) -> "BaseShape":
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        linears = {n: linear_features(m) for n, m in lora_targetable(model).items()}
        head = model.get_output_embeddings()
        return cls(
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            linears=linears,
            embed_path=next((n for n, m in model.named_modules() if m is model.get_input_embeddings()), ""),
            head_path=next((n for n, m in model.named_modules() if m is head), ""),
            vocab_size=model.get_input_embeddings().weight.shape[0],
            tied=head is not None and head.weight is model.get_input_embeddings().weight,
            params=param_targets(model),
        )


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def check_prefix_config(config: dict, base: BaseShape) -> None:
    layers = config.get("num_layers")
    if layers is not None and layers != base.num_layers:
        raise AdapterIncompatible(f"layer count: adapter has {layers} layers, base model has {base.num_layers}", field="num_layers")
    token_dim = config.get("token_dim")
    if token_dim is not None and token_dim != base.num_kv_heads * base.head_dim:
        raise AdapterIncompatible(
            f"head layout: adapter key/value width {token_dim} (num_attention_heads {config.get('num_attention_heads')}), "
            f"base model {base.num_kv_heads} kv heads × {base.head_dim} = {base.num_kv_heads * base.head_dim}",
            field="head_layout",
        )


def check_weights(weights, base: BaseShape, max_lora_rank: int) -> None:
    if isinstance(weights, PromptWeights):
        width = weights.embeddings.shape[1]
        if width != base.hidden_size:
            raise AdapterIncompatible(f"hidden size: adapter embeddings are {width} wide, base model hidden size is {base.hidden_size}", field="hidden_size")
    elif isinstance(weights, PrefixWeights):
        layers, kvh, _, hd = weights.keys.shape
        if layers != base.num_layers:
            raise AdapterIncompatible(f"layer count: adapter has {layers} layers, base model has {base.num_layers}", field="num_layers")
        if (kvh, hd) != (base.num_kv_heads, base.head_dim):
            raise AdapterIncompatible(f"head layout: adapter {kvh}×{hd}, base model {base.num_kv_heads}×{base.head_dim}", field="head_layout")
    elif isinstance(weights, LoraWeights):
        _check_lora(weights, base, max_lora_rank)


def _check_lora(weights: LoraWeights, base: BaseShape, max_lora_rank: int) -> None:
    if not weights.modules and not weights.params and weights.tables is None:
        raise AdapterIncompatible("the LoRA adapter has no target modules", field="target_modules")
    for key, p in weights.params.items():  # names and shapes were checked against this base when parsed (params.py)
        if p.rank > max_lora_rank:
            raise AdapterIncompatible(f"rank {p.rank} of {key!r} is above the configured maximum {max_lora_rank}", field="r")
    missing = sorted(m for m in weights.modules if m not in base.linears)
    if missing:
        deep = [m for m in missing if (x := _LAYER.search(m)) and int(x[1]) >= base.num_layers]
        if deep:
            raise AdapterIncompatible(f"layer count: adapter targets {deep[0]!r} but the base model has {base.num_layers} layers", field="num_layers")
        raise AdapterIncompatible(
            f"target modules absent from the base model (or not linear): {missing[:5]}"
            f"{' and %d more' % (len(missing) - 5) if len(missing) > 5 else ''}",
            field="target_modules",
        )
    for name, m in weights.modules.items():
        if m.rank > max_lora_rank:
            raise AdapterIncompatible(f"rank {m.rank} of {name!r} is above the configured maximum {max_lora_rank}", field="r")
        fan_in, fan_out = base.linears[name]
        if m.a.shape[1] != fan_in or m.b.shape[0] != fan_out:
            raise AdapterIncompatible(
                f"hidden size: {name!r} is {fan_in}→{fan_out} in the base model, the adapter's LoRA is "
                f"{m.a.shape[1]}→{m.b.shape[0]}",
                field="hidden_size",
            )
        if m.b.shape[1] != m.rank:
            raise AdapterIncompatible(f"{name!r}: lora_A rank {m.rank} != lora_B rank {m.b.shape[1]}", field="r")
        for vec, width, field in ((m.bias, fan_out, "lora_bias"), (m.magnitude, fan_out, "use_dora"),
                                  (m.in_scale, fan_in, "feedforward_modules"), (m.out_scale, fan_out, "target_modules")):
            if vec is not None and tuple(vec.shape) != (width,):
                raise AdapterIncompatible(f"{name!r}: {field} vector has shape {tuple(vec.shape)}, the linear needs ({width},)", field=field)
