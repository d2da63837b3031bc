"""Device-ready adapter weights, one class per way an adapter changes the model.

Whatever PEFT type an adapter was saved as, loading turns it into one of the
shapes the engine knows how to apply per row:

- ``LoraWeights``   — a per-linear change inside target linears: a low-rank delta (LoRA, rsLoRA,
  AdaLoRA; with DoRA's magnitude or lora_B's bias) or IA3's scaling vectors; and low-rank deltas
  on MoE expert and router weights (LoRA's target_parameters)
- ``PromptWeights`` — virtual-token embeddings prepended at prefill (prompt tuning, P-tuning)
- ``PrefixWeights`` — per-layer key/value prefix written into the KV cache (prefix tuning, P-tuning v2)
- ``AdaptionWeights`` — gated adaption prompts attended separately in the top layers (LLaMA-Adapter)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch


@dataclass
class LoraModuleWeights:
    a: torch.Tensor  # [r, in_features]; r may be 0 (IA3: only the scaling vectors below)
    b: torch.Tensor  # [out_features, r]
    scale: float
    """Multiplies B(A x): alpha/r, alpha/sqrt(r) for rsLoRA, alpha/(r+1e-5) for AdaLoRA (E folded into A)."""
    bias: torch.Tensor | None = None
    """[out_features] lora_B's bias (LoRA with lora_bias): added as scale * bias."""
    magnitude: torch.Tensor | None = None
    """[out_features] DoRA's magnitude m: the output becomes m / ||W + scale B A||_row times (W x + scale B A x)."""
    in_scale: torch.Tensor | None = None
    """[in_features] IA3 on a feedforward module: multiplies the linear's input."""
    out_scale: torch.Tensor | None = None
    """[out_features] IA3 on any other module: multiplies the linear's output (its bias included)."""
    base_bias: torch.Tensor | None = None
    """[out_features] the linear's bias as the adapter trained it (LoraConfig bias="lora_only" / "all"),
    in place of the base's; unlike lora_B's bias, PEFT's set_scale leaves it unscaled."""

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.a, self.b, self.bias, self.magnitude, self.in_scale, self.out_scale, self.base_bias) if t is not None]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "LoraModuleWeights":
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        return replace(self, a=move(self.a), b=move(self.b), bias=move(self.bias), magnitude=move(self.magnitude),
                       in_scale=move(self.in_scale), out_scale=move(self.out_scale), base_bias=move(self.base_bias))


@dataclass
class ParamLoraWeights:
    """LoRA on a weight parameter (PEFT's target_parameters, lora.ParamWrapper): the product of an input
    with expert e's weight gains scale · B[e] (A[e] x), as PEFT's get_delta_weight adds scale · B_e A_e
    to that expert's slice. A router's 2-D weight is one expert."""

    a: torch.Tensor  # [experts, r, in]
    b: torch.Tensor  # [experts, out, r]
    scale: float
    """alpha / r (alpha / sqrt(r) for rsLoRA), from alpha_pattern where one matches "<module>.<parameter>"."""

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.a, self.b]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "ParamLoraWeights":
        return replace(self, a=self.a.to(device, dtype), b=self.b.to(device, dtype))


@dataclass
class TokenTables:
    """An adapter's own view of the input embedding and the output head, applied per row:
    full copies (modules_to_save, or a saved embedding base layer), LoRA on the embedding,
    and replaced rows of chosen tokens (trainable tokens; PEFT index_copy semantics)."""

    embed: torch.Tensor | None = None
    """[vocab, hidden] the row's embedding table instead of the base's."""
    head: torch.Tensor | None = None
    """[vocab, hidden] the row's output head instead of the base's."""
    embed_a: torch.Tensor | None = None
    """[r, vocab] lora_embedding_A: the embedding of token t gains scale * embed_b @ embed_a[:, t]."""
    embed_b: torch.Tensor | None = None
    """[hidden, r] lora_embedding_B."""
    embed_scale: float = 1.0
    token_ids: torch.Tensor | None = None
    """[k] int64 tokens, ascending, whose embedding rows are replaced by `token_rows`."""
    token_rows: torch.Tensor | None = None
    """[k, hidden]."""
    head_ids: torch.Tensor | None = None
    """[j] int64 tokens whose output-head rows are replaced by `head_rows` (tied or targeted lm_head)."""
    head_rows: torch.Tensor | None = None
    """[j, hidden]."""

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.embed, self.head, self.embed_a, self.embed_b, self.token_rows, self.head_rows) if t is not None]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "TokenTables":
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        ids = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, embed=move(self.embed), head=move(self.head), embed_a=move(self.embed_a), embed_b=move(self.embed_b),
                       token_ids=ids(self.token_ids), token_rows=move(self.token_rows), head_ids=ids(self.head_ids),
                       head_rows=move(self.head_rows))


@dataclass
class LoraWeights:
    modules: dict[str, LoraModuleWeights]
    """Keyed by the module's path in the base model, e.g. "model.layers.0.self_attn.q_proj"."""
    tables: TokenTables | None = None
    """Changes to the input embedding / output head (modules_to_save, embedding LoRA, trainable tokens)."""
    params: dict[str, ParamLoraWeights] = field(default_factory=dict)
    """Keyed by "<module path>.<parameter>", e.g. "model.layers.0.mlp.experts.gate_up_proj" or "model.layers.0.mlp.gate.weight"."""

    def tensors(self) -> list[torch.Tensor]:
        return [t for m in [*self.modules.values(), *self.params.values()] for t in m.tensors()] + \
            (self.tables.tensors() if self.tables else [])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "LoraWeights":
        return LoraWeights({k: m.to(device, dtype) for k, m in self.modules.items()},
                           None if self.tables is None else self.tables.to(device, dtype),
                           {k: p.to(device, dtype) for k, p in self.params.items()})

    @property
    def scalable(self) -> bool:
        """Its change is linear in its scale (low-rank deltas, expert / router deltas included; lora_B biases; no DoRA magnitude,
        IA3 vector, trained base bias or token tables), so a request may rescale it."""
        return self.tables is None and all(m.magnitude is None and m.in_scale is None and m.out_scale is None and m.base_bias is None
                                           for m in self.modules.values())

    @property
    def plain(self) -> bool:
        """Only low-rank deltas on linears: it may also be combined with others (Σ w·ΔW). Not with deltas on expert /
        router weights: PEFT's add_weighted_adapter refuses target_parameters, so there is no combination to match."""
        return self.scalable and not self.params and all(m.bias is None for m in self.modules.values())


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


@dataclass
class AdaptionWeights:
    """LLaMA-Adapter (PEFT ADAPTION_PROMPT): per adapted layer, learned prompt tokens whose keys and
    values (the layer's own k/v projections, no rotary) every query also attends to, in a separate
    softmax scaled by the layer's gate (peft/tuners/adaption_prompt/layer.py)."""

    attention: list[str]
    """Attention module path of each adapted layer, e.g. "model.layers.2.self_attn"."""
    layers: list[int]
    """Layer index of each adapted layer."""
    prompts: torch.Tensor  # [adapted layers, adapter_len, hidden]
    gates: torch.Tensor  # [adapted layers]

    def tensors(self) -> list[torch.Tensor]:
        return [self.prompts, self.gates]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "AdaptionWeights":
        return replace(self, prompts=self.prompts.to(device, dtype), gates=self.gates.to(device, dtype))


AdapterWeights = LoraWeights | PromptWeights | PrefixWeights | AdaptionWeights


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
    """PEFT's own name: LORA, ADALORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING."""
    weights: AdapterWeights
    config: dict = field(default_factory=dict)
    """adapter_config.json as saved by PEFT."""
    score_head: ScoreHead | None = None
    """Sequence-classification adapters (task_type SEQ_CLS) only; such an adapter serves Classify, nothing else."""

    @property
    def kind(self) -> str:
        return {LoraWeights: "lora", PromptWeights: "prompt", PrefixWeights: "prefix", AdaptionWeights: "adaption"}[type(self.weights)]

    @property
    def num_virtual_tokens(self) -> int:
        if isinstance(self.weights, PromptWeights):
            return self.weights.embeddings.shape[0]
        if isinstance(self.weights, PrefixWeights):
            return self.weights.keys.shape[2]
        return 0

    @cached_property
    def nbytes(self) -> int:
        """Computed once: an adapter's tensors never change after loading (the cache sums these under its lock)."""
        head = self.score_head.tensors() if self.score_head is not None else []
        return sum(t.numel() * t.element_size() for t in self.weights.tensors() + head)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "Adapter":
        head = self.score_head.to(device, dtype) if self.score_head is not None else None
        return replace(self, weights=self.weights.to(device, dtype), score_head=head)
