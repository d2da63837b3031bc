"""What a CausalLM does to its head's output before returning logits.

The runner computes logits from the decoder's final hidden states itself (prefill-only
rows read hidden states, adapters may bring their own head), so the step the model
class performs after `lm_head` must be repeated here: Gemma 2/3 soft-cap the logits,
Cohere scales them, Granite divides them. `check_final_logits` compares the result
with the model's own forward at load, so an architecture with some other step is
refused instead of served with subtly different logits.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import ModelLoadError
from .architecture import OWN_ATTENTION

LogitTransform = Callable[[torch.Tensor], torch.Tensor]


def decoder_of(model: nn.Module) -> nn.Module:
    """The CausalLM's body, which returns `last_hidden_state`: the child module holding the input
    embedding (base_model misses some, e.g. Llama 4's text model under a prefix it does not use)."""
    embed = model.get_input_embeddings()
    for child in model.children():
        if child is not embed and any(m is embed for m in child.modules()):
            return child
    return model.base_model


def final_logit_transform(model: nn.Module) -> LogitTransform:
    cfg = model.config.get_text_config()
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)  # Cohere: multiplied
    divisor = getattr(cfg, "logits_scaling", None)  # Granite: divided

    def transform(logits: torch.Tensor) -> torch.Tensor:  # [n, vocab]
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


@torch.inference_mode()
def check_final_logits(model: nn.Module, final: LogitTransform) -> None:
    """The model's own logits for a few tokens against head + `final` over its decoder's
    hidden states, both through the attention the model was loaded with (probe_attention may
    have selected the paged one since): not eager, which some models' configs do not run
    (DeepSeek-V2's and MiniCPM3's latent attention with fewer kv heads than heads)."""
    text = model.config.get_text_config()
    current = model.config._attn_implementation
    model.set_attn_implementation(getattr(model, OWN_ATTENTION, None) or current)
    try:
        _compare(model, final, text)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a load-time check that cannot run refuses the model, by name
        raise ModelLoadError(f"architecture {text.model_type} ({type(model).__name__}): checking its logits failed: "
                             f"{type(e).__name__}: {e}", field="source") from e
    finally:
        model.set_attn_implementation(current)


def _compare(model: nn.Module, final: LogitTransform, text) -> None:
    ids = torch.randint(0, text.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(model.device)
    own = model(input_ids=ids, use_cache=False).logits[0].float()
    hidden = decoder_of(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
    ours = final(model.get_output_embeddings()(hidden)).float()
    error = float((ours - own).abs().max() / own.abs().max().clamp(min=1e-6))
    if error > 1e-3:
        raise ModelLoadError(f"architecture {text.model_type} ({type(model).__name__}): its logits are not its head's output "
                             f"in a way hotswap knows (relative difference {error:.2g})", field="source")
