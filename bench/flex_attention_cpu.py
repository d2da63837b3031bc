"""FlexAttention against the engine's own attention on CPU (issue 11, item 2: "on CPU use what
measures fastest — SDPA per sequence, FlexAttention, or your own packed kernel").

The default model's attention geometry in bf16 (9 query heads, 3 kv heads, head dim 64), keys and
values in a paged pool of 16-token blocks handed out in random order, as a serving engine's pool
is after a while:

- decode: 64 rows, one query token each, every row `context` tokens long; the engine's native
  paged kernel against torch.compile(flex_attention) with a block mask of (1 query, 16 keys) tiles
  whose mask_mod reads each key's owner row and position from the block tables (larger query
  tiles put every row's query in one tile and read the whole pool: far slower);
- prefill: one row's chunk of `n` tokens after `start` cached ones, in a pool holding 8 such rows;
  the engine's choice (its SDPA pass over the gathered blocks, `attention.dense_chunk_attention`,
  or its paged kernel, whichever is faster here) against flex with (128, 16) tiles.

Block-mask construction is timed apart: a server would rebuild it every step (rows come and go,
positions move).

    python bench/flex_attention_cpu.py

Appends a section to bench/RESULTS.md."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from hotswap.server.cpu_threads import COMPUTE_THREADS
from hotswap.server.engine import kernels
from hotswap.server.engine.attention import dense_chunk_attention

from machine import cpu_name

HERE = Path(__file__).parent
HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
SCALE = DIM ** -0.5
DTYPE = torch.bfloat16
FLEX = torch.compile(flex_attention, dynamic=False)


def best_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


class Pool:
    """`rows` rows of `length` tokens each in a shuffled pool of blocks."""

    def __init__(self, rows: int, length: int, gen: torch.Generator) -> None:
        per_row = -(-length // BLOCK)
        blocks = rows * per_row
        self.k = torch.randn(blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(DTYPE)
        self.v = torch.randn(blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(DTYPE)
        self.tables = torch.randperm(blocks, generator=gen).view(rows, per_row).int()  # [rows, per_row]
        owner = torch.empty(blocks, dtype=torch.long)
        first = torch.empty(blocks, dtype=torch.long)
        for r in range(rows):
            owner[self.tables[r].long()] = r
            first[self.tables[r].long()] = torch.arange(per_row) * BLOCK
        self.slot_row = owner.repeat_interleave(BLOCK)  # [pool tokens]: the row each cached position belongs to
        self.slot_pos = (first[:, None] + torch.arange(BLOCK)).reshape(-1)  # [pool tokens]: its position in that row
        tokens = blocks * BLOCK
        # [1, kv_heads, pool tokens, dim]: the pool as flex reads it (one sequence, the mask picks each row's keys)
        self.flex_k = self.k.view(tokens, KV_HEADS, DIM).transpose(0, 1)[None]
        self.flex_v = self.v.view(tokens, KV_HEADS, DIM).transpose(0, 1)[None]

    def mask(self, q_row: torch.Tensor, q_pos: torch.Tensor, q_tile: int):
        """Flex's block mask for queries of rows q_row at positions q_pos (seconds to build it too)."""
        slot_row, slot_pos = self.slot_row, self.slot_pos

        def mask_mod(b, h, q, kv):
            return (slot_row[kv] == q_row[q]) & (slot_pos[kv] <= q_pos[q])

        start = time.perf_counter()
        bm = create_block_mask(mask_mod, None, None, len(q_row), len(slot_row), device="cpu", BLOCK_SIZE=(q_tile, BLOCK))
        return bm, time.perf_counter() - start


def flex(q: torch.Tensor, pool: Pool, bm) -> torch.Tensor:
    """q [n, heads, dim] -> [n, heads, dim]."""
    out = FLEX(q.transpose(0, 1)[None], pool.flex_k, pool.flex_v, block_mask=bm, enable_gqa=True, scale=SCALE)
    return out[0].transpose(0, 1)


def decode(context: int, gen: torch.Generator) -> tuple[float, float, float, float]:
    rows = 64
    pool = Pool(rows, context, gen)
    q = torch.randn(rows, HEADS, DIM, generator=gen).to(DTYPE)
    row_ids = torch.arange(rows, dtype=torch.int32)
    pos = torch.full((rows,), context - 1, dtype=torch.int32)
    out = torch.empty_like(q)
    native = best_ms(lambda: kernels.paged_attention(out, q, pool.k, pool.v, pool.tables, row_ids, pos, SCALE, backend="native"))
    bm, build = pool.mask(row_ids.long(), pos.long(), 1)
    theirs = best_ms(lambda: flex(q, pool, bm))
    diff = (flex(q, pool, bm).float() - out.float()).abs().max().item()
    return native, theirs, build * 1e3, diff


def prefill(n: int, start: int, gen: torch.Generator) -> tuple[float, float, float, float]:
    pool = Pool(8, start + n, gen)
    q = torch.randn(n, HEADS, DIM, generator=gen).to(DTYPE)
    table = pool.tables[0]
    pos = torch.arange(start, start + n, dtype=torch.int32)
    rows = torch.zeros(n, dtype=torch.int32)
    # The chunk's own keys and values are in the pool already (the engine writes them before attending).
    out = torch.empty_like(q)
    paged = best_ms(lambda: kernels.paged_attention(out, q, pool.k, pool.v, table[None], rows, pos, SCALE, backend="native"))
    dense = best_ms(lambda: dense_chunk_attention(q, pool.k, pool.v, table, start, SCALE, 0))
    bm, build = pool.mask(rows.long(), pos.long(), 128)
    theirs = best_ms(lambda: flex(q, pool, bm))
    diff = (flex(q, pool, bm).float() - dense_chunk_attention(q, pool.k, pool.v, table, start, SCALE, 0).float()).abs().max().item()
    return min(paged, dense), theirs, build * 1e3, diff


@torch.inference_mode()
def main() -> None:
    torch.set_num_threads(COMPUTE_THREADS)
    gen = torch.Generator().manual_seed(0)
    lines = ["| case | engine, ms | flex_attention (compiled), ms | flex / engine | flex block mask build, ms | max abs diff |",
             "|---|---|---|---|---|---|"]
    for context in (128, 512, 2048):
        ours, theirs, build, diff = decode(context, gen)
        lines.append(f"| decode, 64 rows × {context} tokens (paged kernel) | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}× "
                     f"| {build:.0f} | {diff:.1e} |")
        print(lines[-1], flush=True)
    for n, start in ((512, 0), (512, 1024), (2048, 2048)):
        ours, theirs, build, diff = prefill(n, start, gen)
        lines.append(f"| prefill chunk, {n} tokens after {start} (engine's faster path) | {ours:.2f} | {theirs:.2f} "
                     f"| {theirs / ours:.1f}× | {build:.0f} | {diff:.1e} |")
        print(lines[-1], flush=True)
    head = (f"`python bench/flex_attention_cpu.py` on {cpu_name()}, torch {torch.__version__}, bf16, {HEADS} query / "
            f"{KV_HEADS} kv heads, head dim {DIM}, one layer's attention")
    with open(HERE / "RESULTS.md", "a") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} — FlexAttention against the engine's attention (CPU)\n\n{head}\n\n"
                + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
