"""Prompt tuning and P-tuning → virtual-token embeddings prepended at prefill.

PEFT saves both as `prompt_embeddings` [num_virtual_tokens, token_dim]: for
P-tuning, save_pretrained already ran the prompt encoder (MLP/LSTM) and stored
its output (PeftModel.get_prompt_embedding_to_save), so serving needs no encoder."""
from __future__ import annotations

import torch

from ..errors import AdapterIncompatible, InvalidArgument
from .weights import PromptWeights


def prompt_weights(config: dict, tensors: dict[str, torch.Tensor]) -> PromptWeights:
    emb = tensors.get("prompt_embeddings")
    if emb is None:
        raise AdapterIncompatible(
            f"{config.get('peft_type')} checkpoint has no 'prompt_embeddings' tensor (found {sorted(tensors)[:4]})",
            field="peft_type",
        )
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterIncompatible("encoder-decoder prompt adapters are not supported", field="num_transformer_submodules")
    if emb.dim() != 2:
        raise InvalidArgument(f"prompt_embeddings must be [num_virtual_tokens, token_dim], got shape {list(emb.shape)}",
                              field="prompt_embeddings")
    nv = config.get("num_virtual_tokens", emb.shape[0])
    if nv > emb.shape[0]:
        raise InvalidArgument(f"num_virtual_tokens {nv} but prompt_embeddings holds {emb.shape[0]}", field="num_virtual_tokens")
    return PromptWeights(emb[:nv].float())
