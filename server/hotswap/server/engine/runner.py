"""One packed forward: the new tokens of every scheduled row flattened into one
sequence with per-token positions, no padding. Builds the inputs (embeddings,
cache slots, block tables, per-token LoRA slots), runs the model once, and
returns the next-token logits of the rows that sample. Owns the model, the
paged KV cache tensors and the LoRA slots; knows nothing of requests."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..adapters.weights import LoraWeights
from ..config import EngineConfig
from ..errors import ModelLoadError
from . import kernels
from .attention import ATTENTION_NAME, BATCH_KWARG, DENSE_MIN_TOKENS, AttentionBatch, DenseChunk
from .kv_cache import PagedKVCache, default_kv_cache_bytes
from .lora import LoraStep, attach_lora
from .scheduler import ScheduledRow

if TYPE_CHECKING:
    from ..model.loader import LoadedModel


def resolve_backend(name: str, device: torch.device) -> str:
    """"auto": the native kernels on CPU when they build, else the torch reference ops."""
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
        self.kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.context_length = int(getattr(text, "max_position_embeddings", 0) or 0)
        self.backend = resolve_backend(cfg.attention_backend, self.device)
        self.block_size = cfg.block_size
        self.lora = attach_lora(self.model, cfg.max_loras, self.device, self.dtype)
        self.model.set_attn_implementation(ATTENTION_NAME)
        if self.model.config._attn_implementation != ATTENTION_NAME:
            raise ModelLoadError(f"{type(self.model).__name__} does not route attention through transformers' "
                                 "AttentionInterface, which the paged KV cache needs", field="source")
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
        dev, bs = self.device, self.block_size
        counts = [s.num_tokens for s in scheduled]
        n_rows, n_tokens = len(scheduled), sum(counts)
        # Per-token row index and position, built with a handful of ops rather than a loop over tokens.
        counts_t = torch.tensor(counts)
        row_of = torch.repeat_interleave(torch.arange(n_rows), counts_t)  # [num_tokens]
        first = torch.cumsum(counts_t, 0) - counts_t  # [rows] packed index of each row's first token
        positions = torch.tensor([s.start for s in scheduled])[row_of] + torch.arange(n_tokens) - first[row_of]
        width = max(len(s.row.block_ids) for s in scheduled)
        tables = torch.zeros(n_rows, width, dtype=torch.int32)  # [rows, max_blocks]
        for i, s in enumerate(scheduled):
            tables[i, : len(s.row.block_ids)] = torch.tensor(s.row.block_ids, dtype=torch.int32)
        slots = tables[row_of, positions // bs].long() * bs + positions % bs  # [num_tokens]
        ids = torch.tensor([t for s in scheduled for t in s.row.tokens(s.start, s.end)])  # virtual tokens < 0
        dense = [DenseChunk(i, int(first[i]), s.num_tokens, s.start) for i, s in enumerate(scheduled)
                 if self.backend == "torch" and s.num_tokens >= DENSE_MIN_TOKENS]
        token_rows = row_of.to(torch.int32)
        for d in dense:
            token_rows[d.q_start: d.q_start + d.num_tokens] = -1
        lora_slots = [s.row.lora_slot for s in scheduled]
        sample_at = [int(first[i]) + s.num_tokens - 1 for i, s in enumerate(scheduled) if s.samples]

        positions = positions.to(dev)
        embeds = self._embeddings(scheduled, ids.to(dev), first.tolist())  # [num_tokens, hidden]
        self._copy_prefixes(scheduled)
        batch = AttentionBatch(self.cache, slots.to(dev), tables.to(dev), token_rows.to(dev), positions.to(torch.int32),
                               dense, n_tokens - sum(d.num_tokens for d in dense), self.backend)
        has_lora = any(s >= 0 for s in lora_slots)
        self.lora.step = LoraStep(torch.tensor(lora_slots, dtype=torch.int32)[row_of].to(dev), self.backend) if has_lora else None
        try:
            hidden = self.decoder(inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False,
                                  **{BATCH_KWARG: batch}).last_hidden_state[0]  # [num_tokens, hidden]
        finally:
            self.lora.step = None
        return self.head(hidden[torch.tensor(sample_at, dtype=torch.long, device=dev)]).float()  # [sampling rows, vocab]

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
