"""A slot-per-row KV cache the model writes into through transformers' Cache protocol.

Row i of the running batch lives in slot i: keys/values [slot, kv_head, pos, dim]
with the row's own positions starting at 0 (prefix-tuning key/values first,
then virtual tokens, prompt and output). Keeping the running rows in slots
0..B-1 lets every forward take plain views — no per-step gather of the cache.
When a row leaves, the last row moves into its slot (one row copy)."""
from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_slots: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        initial_len: int = 256,
    ) -> None:
        self.num_layers, self.max_slots, self.max_len = num_layers, max_slots, max_len
        self.capacity = min(initial_len, max_len)
        shape = (max_slots, num_kv_heads, self.capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]

    def ensure_capacity(self, length: int) -> None:
        """Grow the position axis (doubling) so `length` positions fit."""
        if length <= self.capacity:
            return
        new = self.capacity
        while new < length:
            new *= 2
        new = min(new, self.max_len)
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):
                grown = old.new_zeros(old.shape[:2] + (new,) + old.shape[3:])
                grown[:, :, : self.capacity] = old
                cache[i] = grown
        self.capacity = new

    def write_prefix(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Prefix-tuning key/values, keys/values [layers, kv_heads, n, dim], at positions 0..n-1."""
        n = keys.shape[2]
        for layer in range(self.num_layers):
            self.keys[layer][slot, :, :n] = keys[layer]
            self.values[layer][slot, :, :n] = values[layer]

    def move(self, src: int, dst: int, length: int) -> None:
        for cache in (self.keys, self.values):
            for layer in cache:
                layer[dst, :, :length] = layer[src, :, :length]

    def view(self, first_slot: int, positions: torch.Tensor, kv_len: int) -> "SlotCacheView":
        """The cache as one forward sees it: slots first_slot.. for positions.shape[0] rows,
        new key/values written at `positions` [rows, q_len], attention over 0..kv_len-1."""
        return SlotCacheView(self, first_slot, positions, kv_len)


class SlotCacheView:
    """Duck-types the part of transformers' Cache the attention layers call:
    `update(key_states, value_states, layer_idx)` writes and returns the full key/values."""

    is_compileable = False

    def __init__(self, cache: SlotKVCache, first_slot: int, positions: torch.Tensor, kv_len: int) -> None:
        self.cache = cache
        self.rows = slice(first_slot, first_slot + positions.shape[0])
        self.positions = positions  # [rows, q_len]
        self.row_index = torch.arange(positions.shape[0], device=positions.device)[:, None]  # [rows, 1]
        self.kv_len = kv_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states (rows, kv_heads, q_len, dim); advanced indices on dims 0 and 2 put them first.
        k = self.cache.keys[layer_idx][self.rows]
        v = self.cache.values[layer_idx][self.rows]
        k[self.row_index, :, self.positions] = key_states.transpose(1, 2).to(k.dtype)
        v[self.row_index, :, self.positions] = value_states.transpose(1, 2).to(v.dtype)
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len
