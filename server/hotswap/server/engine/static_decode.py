"""Decode-only steps through fixed buffers, so CUDA graphs can capture them.

A step whose rows all feed back one generated token (no prompt chunk, no per-row
embedding or head tables, no LLaMA-Adapter prompt, no per-request LoRA scale) is
padded to the next bucket size and run from buffers that live as long as the runner:
token ids, positions, cache slots, a block table as wide as max_seq_len allows, the
paged kernel's rows and the LoRA slot of every token. Padding tokens belong to no row
(the paged kernel and the LoRA kernels skip them) and write their keys and values
into one scratch block the block manager never hands out. With the same tensors and
shapes every step of a bucket, the forward is captured once as a CUDA graph and
replayed (vLLM's decode graphs): one launch instead of a Python call per op, which
bounds a decode step on a fast GPU. A graph is keyed by bucket and by the LoRA slots'
layout (rank growth or a newly targeted linear reallocates their tensors), so it is
captured again after such a change; if capture fails the path runs eagerly and says
why once. On CPU the same buffers run eagerly (tests compare them with the plain
packed forward).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .attention import BATCH_KWARG, AttentionBatch
from .lora import LoraStep

if TYPE_CHECKING:
    from .runner import ModelRunner
    from .scheduler import ScheduledRow

log = logging.getLogger("hotswap.engine")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""Padded sizes of a decode step (vLLM captures a similar ladder)."""


def eligible(scheduled: list[ScheduledRow]) -> bool:
    """Every row decodes one token with nothing per row beyond its LoRA slot."""
    return all(s.decode and s.samples and s.row.token_tables is None and s.row.adaption is None
               and s.row.request.lora_scale == 1.0 for s in scheduled)


@dataclass
class Buffers:
    """One bucket's inputs; tensors on the model's device, filled in place every step."""

    ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    positions32: torch.Tensor  # [B] int32, for the paged kernel
    slots: torch.Tensor  # [B] int64 cache slots (padding: the scratch block's first slot)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    token_rows: torch.Tensor  # [B] int32 (padding: -1)
    lora_slots: torch.Tensor  # [B] int32 (padding and rows without LoRA: -1)


class StaticDecode:
    def __init__(self, runner: ModelRunner, max_rows: int, max_blocks: int, scratch_slot: int, capture: bool) -> None:
        self.runner = runner
        self.buckets = [b for b in BUCKETS if b < max_rows] + [max_rows]
        self.max_blocks, self.scratch_slot = max_blocks, scratch_slot
        self.capture = capture and runner.device.type == "cuda"
        self._buffers: dict[int, Buffers] = {}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.steps = 0
        """Steps run through this path (captured or not)."""
        self.replays = 0
        """Of those, replayed CUDA graphs."""

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def run(self, scheduled: list[ScheduledRow]) -> torch.Tensor:
        """Final hidden states [len(scheduled), hidden] of an eligible decode step."""
        n = len(scheduled)
        buf = self._fill(scheduled, self.bucket(n))
        has_lora = any(s.row.lora_slot >= 0 for s in scheduled)
        self.steps += 1
        if self.capture:
            key = (buf.ids.shape[0], has_lora, self.runner.lora.layout_version)
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._capture(key, lambda: self._forward(buf, has_lora))
            if graph is not None:
                graph[0].replay()
                self.replays += 1
                return graph[1][:n]
        return self._forward(buf, has_lora)[:n]

    def _fill(self, scheduled: list[ScheduledRow], size: int) -> Buffers:
        n, bs, width = len(scheduled), self.runner.block_size, self.max_blocks
        ids = torch.zeros(size, dtype=torch.long)
        positions = torch.zeros(size, dtype=torch.long)
        slots = torch.full((size,), self.scratch_slot, dtype=torch.long)
        tables = torch.zeros(size, width, dtype=torch.int32)
        rows = torch.full((size,), -1, dtype=torch.int32)
        lora = torch.full((size,), -1, dtype=torch.int32)
        for i, s in enumerate(scheduled):
            blocks = s.row.block_ids
            ids[i] = s.row.tokens(s.start, s.end)[0]
            positions[i] = s.start
            slots[i] = blocks[s.start // bs] * bs + s.start % bs
            tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
            lora[i] = s.row.lora_slot
        rows[:n] = torch.arange(n, dtype=torch.int32)
        buf = self._buffers.get(size)
        if buf is None:
            dev = self.runner.device
            buf = self._buffers[size] = Buffers(ids.to(dev), positions.to(dev), positions.to(dev, torch.int32), slots.to(dev),
                                                tables.to(dev), rows.to(dev), lora.to(dev))
            return buf
        for dst, src in ((buf.ids, ids), (buf.positions, positions), (buf.positions32, positions), (buf.slots, slots),
                         (buf.block_tables, tables), (buf.token_rows, rows), (buf.lora_slots, lora)):
            dst.copy_(src, non_blocking=True)
        return buf

    def _forward(self, buf: Buffers, has_lora: bool) -> torch.Tensor:
        """The decoder over the bucket's tokens: [B, hidden]. Reads only the buffers."""
        r = self.runner
        size = buf.ids.shape[0]
        embeds = r.embed(buf.ids)  # [B, hidden]
        batch = AttentionBatch(r.cache, buf.slots, buf.block_tables, buf.token_rows, buf.positions32, [], size, r.backend)
        r.lora.step = LoraStep.of(buf.lora_slots, None, r.lora.slots.max_loras, r.backend) if has_lora else None
        try:
            return r.decoder(inputs_embeds=embeds[None], position_ids=buf.positions[None], use_cache=False,
                             **{BATCH_KWARG: batch}).last_hidden_state[0]
        finally:
            r.lora.step = None

    def _capture(self, key: tuple, forward: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """Warm up on a side stream (Triton compiles, cuBLAS sizes its workspace), then capture. Writing
        the step's keys and values during warm-up is harmless: replay writes the same ones."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = forward()
        except Exception as e:  # noqa: BLE001 - serving goes on eagerly; the reason is logged once
            log.warning("CUDA graph capture failed, decode steps run eagerly: %s: %s", type(e).__name__, e)
            self.capture = False
            return None
        self._graphs[key] = (graph, out)
        return self._graphs[key]
