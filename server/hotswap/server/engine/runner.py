"""One forward pass over a set of rows: builds embeddings, positions, the
attention mask and the cache view, applies each row's adapter, returns the
next-token logits. Owns the model and the KV cache; knows nothing of requests."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config import EngineConfig
from .batch import Row
from .kv_cache import SlotKVCache
from .lora import LoraBatch, LoraContext, LoraRowSlots, attach_lora

if TYPE_CHECKING:
    from ..model.loader import LoadedModel



class ModelRunner:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig) -> None:
        self.model = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        text_cfg = self.model.config.get_text_config()
        self.num_layers = text_cfg.num_hidden_layers
        self.num_kv_heads = getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
        self.layer_types = getattr(text_cfg, "layer_types", None)
        self.sliding_window = getattr(text_cfg, "sliding_window", None)
        self.lora_groups_max = cfg.lora_gather_threshold
        self.lora_ctx = LoraContext(LoraRowSlots(cfg.max_batch_size, self.device, self.dtype))
        self.lora_modules = attach_lora(self.model, self.lora_ctx)
        self.decoder = self.model.base_model
        self.embed = self.model.get_input_embeddings()
        self.head = self.model.get_output_embeddings()
        self.cache = SlotKVCache(
            self.num_layers, self.num_kv_heads, self.head_dim, cfg.max_batch_size, cfg.max_seq_len, self.device, self.dtype
        )

    # -- masks -----------------------------------------------------------------
    def _mask(self, positions: torch.Tensor, kv_len: int):
        """Causal in each row's own positions: query at p sees keys 0..p of its slot.
        Additive float mask (rows, 1, q_len, kv_len) that both sdpa and eager accept."""
        keys = torch.arange(kv_len, device=self.device)
        allowed = keys[None, None, :] <= positions[:, :, None]  # (rows, q, kv)
        masks = {"full_attention": allowed}
        if self.layer_types and "sliding_attention" in self.layer_types and self.sliding_window:
            masks["sliding_attention"] = allowed & (keys[None, None, :] > positions[:, :, None] - self.sliding_window)
        neg = torch.finfo(self.dtype).min
        out = {k: torch.zeros(m.shape, device=self.device, dtype=self.dtype).masked_fill_(~m, neg)[:, None] for k, m in masks.items()}
        return out if len(out) > 1 else out["full_attention"]

    def _forward(self, first_slot: int, rows: list[Row], embeds: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        kv_len = int(positions.max()) + 1
        self.cache.ensure_capacity(kv_len)
        view = self.cache.view(first_slot, positions, kv_len)
        self.lora_ctx.batch = LoraBatch.plan([r.lora for r in rows], first_slot, self.lora_groups_max, self.device)
        try:
            hidden = self.decoder(
                inputs_embeds=embeds,
                attention_mask=self._mask(positions, kv_len),
                position_ids=positions,
                past_key_values=view,
                use_cache=True,
            ).last_hidden_state  # (rows, q_len, hidden)
        finally:
            self.lora_ctx.batch = LoraBatch()
        picked = hidden[torch.arange(len(rows), device=self.device), last]  # (rows, hidden)
        return self.head(picked).float()  # (rows, vocab)

    # -- the two kinds of step -------------------------------------------------
    @torch.inference_mode()
    def prefill(self, first_slot: int, rows: list[Row]) -> torch.Tensor:
        """Rows occupy slots first_slot.. in order. Writes prefix key/values, runs
        virtual tokens + prompt (right-padded), returns logits of each row's last token."""
        chunks, starts = [], []
        for i, row in enumerate(rows):
            ids = torch.tensor(row.prompt_ids, device=self.device)
            emb = self.embed(ids)  # (len, hidden)
            if row.prompt_embeddings is not None:
                emb = torch.cat([row.prompt_embeddings.to(emb.dtype), emb])
            start = 0
            self.lora_ctx.slots.assign(first_slot + i, row.lora)
            if row.prefix is not None:
                self.cache.ensure_capacity(row.prefix.keys.shape[2] + emb.shape[0])
                self.cache.write_prefix(first_slot + i, row.prefix.keys, row.prefix.values)
                start = row.prefix.keys.shape[2]
            chunks.append(emb)
            starts.append(start)
        width = max(c.shape[0] for c in chunks)
        embeds = chunks[0].new_zeros(len(rows), width, chunks[0].shape[1])
        for i, c in enumerate(chunks):
            embeds[i, : c.shape[0]] = c
        starts_t = torch.tensor(starts, device=self.device)
        positions = starts_t[:, None] + torch.arange(width, device=self.device)[None, :]  # (rows, width)
        last = torch.tensor([c.shape[0] - 1 for c in chunks], device=self.device)
        logits = self._forward(first_slot, rows, embeds, positions, last)
        for row, start, c in zip(rows, starts, chunks):
            row.length = start + c.shape[0]
        return logits

    def move_row(self, src: int, dst: int, length: int) -> None:
        """A row changes slot (the batch was compacted): its key/values and LoRA slot follow."""
        self.cache.move(src, dst, length)
        self.lora_ctx.slots.move(src, dst)

    @torch.inference_mode()
    def decode(self, first_slot: int, rows: list[Row]) -> torch.Tensor:
        """Rows in slots first_slot.. each feed their last sampled token."""
        ids = torch.tensor([r.output_ids[-1] for r in rows], device=self.device)
        positions = torch.tensor([r.length for r in rows], device=self.device)[:, None]  # (rows, 1)
        logits = self._forward(first_slot, rows, self.embed(ids)[:, None], positions, torch.zeros(len(rows), dtype=torch.long, device=self.device))
        for row in rows:
            row.length += 1
        return logits
