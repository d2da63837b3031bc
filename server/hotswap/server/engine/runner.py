"""One packed forward: the new tokens of every scheduled row flattened into one
sequence with per-token positions, no padding. Builds the inputs (embeddings,
cache slots, block tables, per-token LoRA slots), runs the model once, and
returns the next-token logits of the rows that sample. Owns the model, the
paged KV cache tensors and the LoRA slots; knows nothing of requests.

Architectures whose attention cannot be paged (engine/architecture.py decides at
load) run the same inputs row by row through their own attention (own_attention.py)."""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from ..adapters.weights import LoraWeights
from ..config import EngineConfig
from ..errors import ModelLoadError
from . import kernels
from .architecture import probe_attention
from .attention import BATCH_KWARG, AttentionBatch
from .inputs import build_inputs
from .kv_cache import PagedKVCache, default_kv_cache_bytes
from .lora import LoraStep, attach_lora
from .own_attention import forward_rows
from .scheduler import ScheduledRow

if TYPE_CHECKING:
    from ..model.loader import LoadedModel


def resolve_backend(name: str, device: torch.device) -> str:
    """"auto": the native kernels on CPU when they build (once per machine), else the torch reference ops."""
    if name == "auto":
        return "native" if device.type == "cpu" and kernels.native_available() else "torch"
    if name == "native" and not kernels.native_available():
        raise ModelLoadError(f"native kernels unavailable: {kernels.native_unavailable_reason()}", field="attention_backend")
    return name


class ModelRunner:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig) -> None:
        self.model = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        text = self.model.config.get_text_config()
        self.num_layers = text.num_hidden_layers
        # The cache's geometry is what the layers actually produce (probed), not what the config suggests.
        self.layout = probe_attention(self.model)
        self.kv_heads, self.head_dim = self.layout.kv_heads, self.layout.head_dim
        self.context_length = int(getattr(text, "max_position_embeddings", 0) or 0)
        self.backend = resolve_backend(cfg.attention_backend, self.device)
        self.block_size = cfg.block_size
        self.lora = attach_lora(self.model, cfg.max_loras, self.device, self.dtype)
        if "logits_to_keep" not in inspect.signature(self.model.forward).parameters:
            raise ModelLoadError(f"{type(self.model).__name__} takes no logits_to_keep: the engine computes logits "
                                 "through the model's own head with it", field="source")
        self.decoder = self.model.base_model
        self.embed = self.model.get_input_embeddings()
        self.head = self.model.get_output_embeddings()
        self.cache: PagedKVCache | None = None

    def allocate_cache(self, budget_bytes: int, max_blocks: int, reserved: int = 0) -> int:
        """Allocate the paged cache within `budget_bytes` (0 = the device default, leaving
        `reserved` bytes for adapters), at most `max_blocks` blocks; returns the number of blocks."""
        per_block = PagedKVCache.bytes_per_block(self.num_layers, self.block_size, self.kv_heads, self.head_dim, self.dtype)
        budget = budget_bytes or default_kv_cache_bytes(self.device, reserved)
        num_blocks = min(budget // per_block, max_blocks)
        if num_blocks < 1:
            raise ModelLoadError(f"a KV budget of {budget} bytes holds no block of {per_block} bytes", field="kv_cache_mb")
        self.cache = PagedKVCache(self.num_layers, num_blocks, self.block_size, self.kv_heads, self.head_dim, self.device, self.dtype)
        return num_blocks

    def load_lora(self, slot: int, weights: LoraWeights) -> None:
        self.lora.slots.load(slot, weights)

    # -- the forward -------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRow]) -> torch.Tensor:
        """Logits [rows that sample, vocab] (float32), in scheduled order."""
        dev = self.device
        step = build_inputs(scheduled, self.block_size, dense_chunks=self.backend == "torch")
        positions = step.positions.to(dev)
        embeds = self._embeddings(scheduled, step.ids.to(dev), step.first)  # [num_tokens, hidden]
        self._copy_prefixes(scheduled)
        if not self.layout.paged:
            return forward_rows(self.model, self.cache, scheduled, step, embeds, self.lora, self.backend)
        paged_tokens = len(step.ids) - sum(d.num_tokens for d in step.dense)
        batch = AttentionBatch(self.cache, step.slots.to(dev), step.block_tables.to(dev), step.token_rows.to(dev),
                               positions.to(torch.int32), step.dense, paged_tokens, self.backend)
        self.lora.step = LoraStep(step.lora_slots.to(dev), self.backend) if step.lora_slots is not None else None
        try:
            # The CausalLM forward rather than decoder + lm_head: logits_to_keep computes only the sampling rows'
            # logits, and whatever the architecture does after its head (Gemma 2's final soft-capping) is kept.
            logits = self.model(inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False,
                                logits_to_keep=step.sample_at.to(dev), **{BATCH_KWARG: batch}).logits[0]
        finally:
            self.lora.step = None
        return logits.float()  # [sampling rows, vocab]

    def _embeddings(self, scheduled: list[ScheduledRow], ids: torch.Tensor, first: list[int]) -> torch.Tensor:
        """Token embeddings; prompt-tuning positions take the adapter's virtual-token embeddings."""
        embeds = self.embed(ids.clamp(min=0))
        for s, q in zip(scheduled, first):
            table = s.row.prompt_embeddings  # [num_virtual, hidden]
            if table is not None and s.start < len(table):
                end = min(s.end, len(table))
                embeds[q: q + end - s.start] = table[s.start: end].to(embeds.dtype)
        return embeds

    def _copy_prefixes(self, scheduled: list[ScheduledRow]) -> None:
        """Prefix tuning: the adapter's key/values go straight into the row's first positions."""
        for s in scheduled:
            if s.copy_from < s.start:
                pos = torch.arange(s.copy_from, s.start)
                blocks = torch.tensor(s.row.block_ids)[pos // self.block_size]
                slots = (blocks * self.block_size + pos % self.block_size).to(self.device)
                prefix = s.row.prefix
                self.cache.write_all_layers(prefix.keys[:, :, s.copy_from: s.start], prefix.values[:, :, s.copy_from: s.start], slots)
