"""The paged KV cache's tensors: one pool of fixed-size blocks per layer, sized by a
byte budget. Which row owns which block is `kv_blocks`' business; this module only
stores and copies.

Layout per layer: [num_blocks, block_size, kv_heads, head_dim] (flash-attn's paged
layout), so the token at slot s = block * block_size + offset is row s of a
[num_blocks * block_size, kv_heads, head_dim] view. The pool is allocated once at
its budget and never grows, so the cache's memory never exceeds the budget; on
CPU its pages are touched at start (see PagedKVCache)."""
from __future__ import annotations

import os

import torch

from . import kernels

CPU_RAM_FRACTION = 0.10
"""Default KV budget on CPU: this fraction of physical RAM."""
CUDA_FREE_FRACTION = 0.85
"""Default KV budget on CUDA: this fraction of the memory free after the weights are loaded
(less the adapters' reservation)."""


def default_kv_cache_bytes(device: torch.device, reserved: int = 0) -> int:
    """`reserved`: device bytes other users will take later (the adapter cache's device tier
    and the LoRA slots that copy from it), kept out of the CUDA budget."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(max(0, free - reserved) * CUDA_FREE_FRACTION)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * CPU_RAM_FRACTION)


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        # On CPU the pages are touched now (zeros, not empty): the server holds its KV budget from
        # the start, so its memory does not creep up for minutes as traffic reaches block after
        # block, and a node too small for the budget fails here rather than mid-request.
        alloc = torch.zeros if device.type == "cpu" else torch.empty
        self.keys = alloc(shape, device=device, dtype=dtype)
        self.values = alloc(shape, device=device, dtype=dtype)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self.keys[layer], self.values[layer]

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """key/value [num_tokens, kv_heads, head_dim] into slots [num_tokens]."""
        kernels.kv_write(self.keys[layer], self.values[layer], key, value, slots)

    def write_all_layers(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        """Prefix tuning: keys/values [layers, kv_heads, n, head_dim] into slots [n] of every layer at once."""
        flat = (self.keys.shape[0], -1, *self.keys.shape[3:])
        self.keys.view(flat).index_copy_(1, slots, keys.transpose(1, 2).to(self.keys.dtype))
        self.values.view(flat).index_copy_(1, slots, values.transpose(1, 2).to(self.values.dtype))
