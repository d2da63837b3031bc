"""Prefix tuning (and P-tuning v2) → per-layer key/value prefixes.

PEFT saves the prefix as `prompt_embeddings` [nv, num_layers * 2 * token_dim];
with prefix_projection, save_pretrained already ran the projection MLP. Its
get_prompt views that as [nv, num_layers*2, kv_heads, head_dim] and permutes
to (layers*2, kv_heads, nv, head_dim): even rows are keys, odd rows values.
For grouped-query models token_dim = kv_heads * head_dim (peft #1901)."""
from __future__ import annotations

import torch

from ..errors import AdapterIncompatible, InvalidArgument
from .weights import PrefixWeights


def prefix_weights(config: dict, tensors: dict[str, torch.Tensor], num_kv_heads: int, head_dim: int) -> PrefixWeights:
    emb = tensors.get("prompt_embeddings")
    if emb is None:
        raise AdapterIncompatible(f"PREFIX_TUNING checkpoint has no 'prompt_embeddings' tensor (found {sorted(tensors)[:4]})", field="peft_type")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterIncompatible("encoder-decoder prefix adapters are not supported", field="num_transformer_submodules")
    if emb.dim() != 2:
        raise InvalidArgument(f"prompt_embeddings must be [num_virtual_tokens, width], got shape {list(emb.shape)}", field="prompt_embeddings")
    nv = config.get("num_virtual_tokens", emb.shape[0])
    if nv > emb.shape[0]:
        raise InvalidArgument(f"num_virtual_tokens {nv} but prompt_embeddings holds {emb.shape[0]}", field="num_virtual_tokens")
    layers = config.get("num_layers")
    width = 2 * num_kv_heads * head_dim
    if emb.shape[1] % width:
        raise AdapterIncompatible(
            f"prefix width {emb.shape[1]} is not a multiple of 2 × kv_heads × head_dim = {width} of the base model "
            f"(head layout mismatch: the adapter has token_dim {config.get('token_dim')}, "
            f"num_attention_heads {config.get('num_attention_heads')})",
            field="head_layout",
        )
    if layers is None:
        layers = emb.shape[1] // width
    if layers * width != emb.shape[1]:
        raise AdapterIncompatible(
            f"prefix width {emb.shape[1]} != num_layers {layers} × 2 × {num_kv_heads} kv heads × {head_dim} head_dim",
            field="head_layout",
        )
    kv = emb[:nv].float().view(nv, layers * 2, num_kv_heads, head_dim).permute(1, 2, 0, 3)  # (L*2, kvh, nv, hd)
    return PrefixWeights(kv[0::2].contiguous(), kv[1::2].contiguous())
