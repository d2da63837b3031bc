"""What prefill-only rows read from the shared forward, instead of sampling.

A CLASSIFY row applies its adapter's score head to the final (normed) hidden state
of its last token — what transformers' *ForSequenceClassification pools for an
unpadded sequence — once the chunk holding that token is computed. A SCORE row
needs, at every position before a continuation token, the log-probability of that
token; those positions may be spread over several prompt chunks, so each step
reads the ones its chunk computed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .request import Task
from .scheduler import ScheduledRow

SLICE = 256
"""Scored positions per LM-head call: a whole prompt chunk at once would hold [chunk, vocab] float32
logits twice over (2048 × 49k ≈ 400 MB each for SmolLM2)."""


@dataclass
class ForwardOutput:
    logits: torch.Tensor
    """[rows that sample, vocab] float32, in scheduled order."""
    readouts: dict[int, torch.Tensor] = field(default_factory=dict)
    """By row key: a CLASSIFY row's [num_labels] logits (its last chunk only); a SCORE row's
    [n, 2] (log-prob, is the argmax) of the continuation tokens its chunk scored."""

    @staticmethod
    def concat(parts: list["ForwardOutput"]) -> "ForwardOutput":
        return ForwardOutput(torch.cat([p.logits for p in parts]), {k: v for p in parts for k, v in p.readouts.items()})


def scored_positions(s: ScheduledRow) -> range:
    """Positions of this chunk whose logits predict a continuation token of a SCORE row."""
    row = s.row
    return range(max(s.start, row.first_scored - 1), min(s.end, row.num_tokens - 1))


def read(scheduled: list[ScheduledRow], first: list[int], hidden: torch.Tensor,
         logits: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, torch.Tensor]:
    """hidden [num_tokens, hidden] of the packed forward; first: each row's first packed index;
    logits: the runner's hidden → next-token logits (float32)."""
    out: dict[int, torch.Tensor] = {}
    for s, q in zip(scheduled, first):
        task = s.row.request.task
        if task is Task.CLASSIFY and s.last:
            h = hidden[q + s.num_tokens - 1]  # [hidden]
            score = s.row.score_head
            logits = h.to(score.weight.dtype) @ score.weight.T  # [num_labels]
            out[s.row.key] = (logits if score.bias is None else logits + score.bias).float()
        elif task is Task.SCORE and (span := scored_positions(s)):
            at = torch.arange(span.start, span.stop, device=hidden.device) - s.start + q  # [n] packed indices
            targets = torch.tensor(s.row.tokens(span.start + 1, span.stop + 1), device=hidden.device)  # [n]
            out[s.row.key] = torch.cat([_token_logprobs(hidden[at[i: i + SLICE]], targets[i: i + SLICE], logits)
                                        for i in range(0, len(at), SLICE)])  # [n, 2]
    return out



def _token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """hidden [n, hidden], targets [n] → [n, 2]: log p(target), and whether target was the argmax."""
    logprobs = torch.log_softmax(logits(hidden), -1)  # [n, vocab]
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    return torch.stack([picked, (logprobs.argmax(-1) == targets).float()], 1)
