"""The host-side inputs of one packed forward, built from the scheduler's output:
the new tokens of every scheduled row laid out one row after another."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import DenseChunk, DenseRule
from .scheduler import ScheduledRow


@dataclass
class StepInputs:
    ids: torch.Tensor
    """[num_tokens] token ids; virtual tokens of prompt-tuning rows are negative (embedded from the adapter)."""
    positions: torch.Tensor
    """[num_tokens] each token's position in its own row."""
    first: list[int]
    """Packed index of each scheduled row's first token."""
    block_tables: torch.Tensor
    """[rows, max_blocks] int32."""
    slots: torch.Tensor
    """[num_tokens] int64 KV cache slot each token's key/value is written to."""
    token_rows: torch.Tensor
    """[num_tokens] int32 row of each token for the paged kernel; -1 inside dense chunks."""
    dense: list[DenseChunk]
    """Prompt chunks attended with SDPA over gathered blocks (torch path only)."""
    lora_slots: torch.Tensor | None
    """[num_tokens] int32 LoRA slot of each token's row (-1: none); None when no row has LoRA."""
    lora_scales: torch.Tensor | None
    """[num_tokens] float32 per-request LoRA scale of each token's row; None when every row uses 1."""
    lora_slot_set: frozenset[int]
    """The LoRA slots the step's rows use (host side: what may skip a module no row's adapter targets)."""
    sample_at: torch.Tensor
    """[sampling rows] packed index of the token whose logits give each sampling row's next token."""


def build_inputs(scheduled: list[ScheduledRow], block_size: int, dense_rule: DenseRule | None) -> StepInputs:
    """`dense_rule`: which chunks attend through SDPA (attention.py); None: none."""
    counts = torch.tensor([s.num_tokens for s in scheduled])
    n_rows, n_tokens = len(scheduled), int(counts.sum())
    # Per-token row index and position with a handful of ops rather than a loop over tokens.
    row_of = torch.repeat_interleave(torch.arange(n_rows), counts)  # [num_tokens]
    first = torch.cumsum(counts, 0) - counts  # [rows]
    positions = torch.tensor([s.start for s in scheduled])[row_of] + torch.arange(n_tokens) - first[row_of]
    tables = torch.zeros(n_rows, max(len(s.row.block_ids) for s in scheduled), dtype=torch.int32)
    for i, s in enumerate(scheduled):
        tables[i, : len(s.row.block_ids)] = torch.tensor(s.row.block_ids, dtype=torch.int32)
    slots = tables[row_of, positions // block_size].long() * block_size + positions % block_size
    first_list = first.tolist()
    dense = [DenseChunk(i, first_list[i], s.num_tokens, s.start) for i, s in enumerate(scheduled)
             if dense_rule is not None and dense_rule.takes(s.start, s.num_tokens)]
    token_rows = row_of.to(torch.int32)
    for d in dense:
        token_rows[d.q_start: d.q_start + d.num_tokens] = -1
    lora = [s.row.lora_slot for s in scheduled]
    scales = [s.row.request.lora_scale for s in scheduled]
    return StepInputs(
        ids=torch.tensor([t for s in scheduled for t in s.row.tokens(s.start, s.end)]),
        positions=positions,
        first=first_list,
        block_tables=tables,
        slots=slots,
        token_rows=token_rows,
        dense=dense,
        lora_slots=torch.tensor(lora, dtype=torch.int32)[row_of] if any(x >= 0 for x in lora) else None,
        lora_scales=torch.tensor(scales, dtype=torch.float32)[row_of] if any(x != 1.0 for x in scales) else None,
        lora_slot_set=frozenset(x for x in lora if x >= 0),
        sample_at=torch.tensor([first_list[i] + s.num_tokens - 1 for i, s in enumerate(scheduled) if s.samples], dtype=torch.long),
    )
