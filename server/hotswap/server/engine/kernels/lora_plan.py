"""A step's tokens grouped by LoRA slot and cut into tiles, for the Triton LoRA kernels
(`triton_ops`): built on the device by torch ops, without reading anything back, so a
step needs no host sync and the tile table's shape depends only on the token count."""
from __future__ import annotations

from dataclasses import dataclass

import torch

LORA_BLOCK_M = 16
"""Tokens of one slot per LoRA tile (tl.dot's smallest M)."""


@dataclass
class LoraPlan:
    """A step's tokens grouped by LoRA slot (built on the device by torch ops, no host sync)."""

    order: torch.Tensor
    """[N] int32: token indices, those of slot 0 first, then slot 1, ... (tokens without a slot last, in no tile)."""
    tiles: torch.Tensor
    """[T, 3] int32: (first index into order, token count 0..LORA_BLOCK_M, slot); T bounds the real
    number of tiles, and tiles past it have count 0 (their programs return at once)."""


def lora_plan(token_slots: torch.Tensor, num_slots: int, block_m: int = LORA_BLOCK_M) -> LoraPlan:
    """token_slots [N] int32 (-1: no LoRA) of a step with `num_slots` slots."""
    n = token_slots.numel()
    dev = token_slots.device
    bucket = torch.where(token_slots >= 0, token_slots.long(), num_slots)  # [N]: no slot sorts last
    order = torch.argsort(bucket, stable=True).to(torch.int32)
    # [S] tokens per slot (scatter_add, not bincount: on CUDA bincount reads the maximum back to size its output)
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=dev).scatter_add_(0, bucket, torch.ones_like(bucket))[:num_slots]
    seg_start = torch.cumsum(counts, 0) - counts  # [S] slot s's first index into order
    ntiles = (counts + block_m - 1) // block_m  # [S]
    tile_end = torch.cumsum(ntiles, 0)  # [S] inclusive
    bound = max(1, min(n, -(-n // block_m) + num_slots))  # every tile holds a token; each slot wastes < 1 tile
    i = torch.arange(bound, device=dev)
    slot = torch.searchsorted(tile_end, i, right=True)  # [T]; num_slots past the last real tile
    s = slot.clamp(max=num_slots - 1)
    local = i - (tile_end[s] - ntiles[s])
    count = torch.where(slot < num_slots, (counts[s] - local * block_m).clamp(0, block_m), 0)
    tiles = torch.stack([seg_start[s] + local * block_m, count, s], 1).to(torch.int32)
    return LoraPlan(order, tiles)
