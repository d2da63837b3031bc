"""Device-ready adapter weights, one class per way an adapter changes the model.

Whatever PEFT type an adapter was saved as, loading turns it into one of three
shapes the engine knows how to apply per row:

- ``LoraWeights``   — a low-rank delta inside target linears (LoRA, rsLoRA, AdaLoRA)
- ``PromptWeights`` — virtual-token embeddings prepended at prefill (prompt tuning, P-tuning)
- ``PrefixWeights`` — per-layer key/value prefix written into the KV cache (prefix tuning, P-tuning v2)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class LoraModuleWeights:
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float
    """Multiplies B(A x): alpha/r, alpha/sqrt(r) for rsLoRA, alpha/(r+1e-5) for AdaLoRA (E folded into A)."""

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraWeights:
    modules: dict[str, LoraModuleWeights]
    """Keyed by the module's path in the base model, e.g. "model.layers.0.self_attn.q_proj"."""

    def tensors(self) -> list[torch.Tensor]:
        return [t for m in self.modules.values() for t in (m.a, m.b)]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "LoraWeights":
        return LoraWeights(
            {k: replace(m, a=m.a.to(device, dtype), b=m.b.to(device, dtype)) for k, m in self.modules.items()}
        )


@dataclass
class PromptWeights:
    embeddings: torch.Tensor  # [num_virtual_tokens, hidden_size]

    def tensors(self) -> list[torch.Tensor]:
        return [self.embeddings]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "PromptWeights":
        return PromptWeights(self.embeddings.to(device, dtype))


@dataclass
class PrefixWeights:
    keys: torch.Tensor  # [num_layers, num_kv_heads, num_virtual_tokens, head_dim]
    values: torch.Tensor  # [num_layers, num_kv_heads, num_virtual_tokens, head_dim]

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "PrefixWeights":
        return PrefixWeights(self.keys.to(device, dtype), self.values.to(device, dtype))


AdapterWeights = LoraWeights | PromptWeights | PrefixWeights


@dataclass
class ScoreHead:
    """A sequence-classification adapter's classifier: logits = weight · h (+ bias), h the final
    (normed) hidden state of the row's last token, as transformers' *ForSequenceClassification."""

    weight: torch.Tensor  # [num_labels, hidden_size]
    bias: torch.Tensor | None  # [num_labels]
    labels: list[str]
    """Label names, in the head's order."""

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "ScoreHead":
        return ScoreHead(self.weight.to(device, dtype), None if self.bias is None else self.bias.to(device, dtype), self.labels)


@dataclass
class Adapter:
    """One loaded adapter: identity, what PEFT called it, and weights in one of the three shapes."""

    id: str
    """Registry id, e.g. "support-bot@3"; also the key for prefix caching."""
    peft_type: str
    """PEFT's own name: LORA, ADALORA, PROMPT_TUNING, P_TUNING, PREFIX_TUNING."""
    weights: AdapterWeights
    config: dict = field(default_factory=dict)
    """adapter_config.json as saved by PEFT."""
    score_head: ScoreHead | None = None
    """Sequence-classification adapters (task_type SEQ_CLS) only; such an adapter serves Classify, nothing else."""

    @property
    def kind(self) -> str:
        return {LoraWeights: "lora", PromptWeights: "prompt", PrefixWeights: "prefix"}[type(self.weights)]

    @property
    def num_virtual_tokens(self) -> int:
        if isinstance(self.weights, PromptWeights):
            return self.weights.embeddings.shape[0]
        if isinstance(self.weights, PrefixWeights):
            return self.weights.keys.shape[2]
        return 0

    @property
    def nbytes(self) -> int:
        head = self.score_head.tensors() if self.score_head is not None else []
        return sum(t.numel() * t.element_size() for t in self.weights.tensors() + head)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "Adapter":
        head = self.score_head.to(device, dtype) if self.score_head is not None else None
        return replace(self, weights=self.weights.to(device, dtype), score_head=head)
