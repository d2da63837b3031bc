"""Keeping the base's behaviour outside the taught task.

Trained on a narrow dataset alone, an adapter learns to give its one answer to
everything (issue 12: an identity set taught the model to answer "What is the capital
of France?" with its name). So a job mixes in *replay* rows: the built-in general
prompts (general_prompts.REPLAY) with the base model's own greedy answers, generated
in the job by the base it trains on and cached per base. The rows either take the
ordinary loss on those answers (`replay`), or pull the adapter's next-token
distribution at those positions towards the base's (`kl`, objective.py), or both.

The KL term needs no second model and no extra forward pass while training: when the
base answers a prompt, its top TOP_K next-token log-probabilities at each answer
position are kept beside the answer (teacher-forced, once per base, cached), and the
loss compares the adapter's distribution with them (a top-k approximation of the
forward KL, as in sparse knowledge distillation).

How many: one replay row per training row, at least MIN_ROWS, at most the pool
(len(REPLAY)): small narrow datasets, which over-generalise most, get the most
protection relative to their size; large ones get the pool, a small fraction.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .general_prompts import REPLAY
from .generation import Answer, greedy, render

MIN_ROWS = 16
TOP_K = 20
MAX_ANSWER_TOKENS = 32
"""Base answers are cut here: replay keeps how answers start, which is where an
over-eager adapter shows (its one answer instead of the base's); every token costs
training time (at 48 tokens the default LoRA job on the identity set trains 9% more tokens)."""


def replay_rows_for(n_train: int, ratio: float = 1.0, pool: int = len(REPLAY)) -> int:
    """The documented rule: ratio × n_train, at least MIN_ROWS, at most the pool."""
    return min(pool, max(MIN_ROWS, round(ratio * n_train)))


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def pick_prompts(count: int, exclude: list[str], seed: int) -> list[str]:
    """`count` general prompts, none equal (case and punctuation aside) to a prompt of the
    training data: the task's own answer wins there, replay must not fight it."""
    taken = {_norm(t) for t in exclude}
    pool = [p for p in REPLAY if _norm(p) not in taken]
    return random.Random(seed).sample(pool, min(count, len(pool)))


@dataclass
class BaseAnswer(Answer):
    top_ids: list[list[int]] = None
    """Per position predicting an answer token (and the EOS when finished): the base's TOP_K likeliest tokens."""
    top_logp: list[list[float]] = None
    """Their log-probabilities under the base."""


@torch.inference_mode()
def teacher_top_k(model, prompts: list[list[int]], answers: list[list[int]], chunk: int = 16) -> list[tuple[list, list]]:
    """Teacher-forced on each prompt + answer (batched, right-padded, logits only where an
    answer token is predicted): the base's top-k ids and log-probs at each such position."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), chunk):
        rows = list(zip(prompts[start:start + chunk], answers[start:start + chunk]))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)  # position t predicts token t + 1
        for r, (p, a) in enumerate(rows):
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
            mask[r, :len(p) + len(a)] = 1
            keep[r, len(p) - 1:len(p) + len(a) - 1] = True
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device)).logits  # [N, V]
        else:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[keep.to(device)]
        top = torch.log_softmax(logits.float(), dim=-1).topk(TOP_K, dim=-1)
        ids_k, logp_k = top.indices.tolist(), [[round(v, 4) for v in row] for row in top.values.tolist()]
        at = 0
        for _, a in rows:
            out.append((ids_k[at:at + len(a)], logp_k[at:at + len(a)]))
            at += len(a)
    return out


@dataclass
class BaseAnswers:
    """The base's answers to general prompts, cached in one JSON file per base (fingerprint,
    quantization, dtype, answer length): the first job on a base pays for generating them."""

    path: Path

    @classmethod
    def for_base(cls, cache_dir: Path, fingerprint: str, quantization: str, dtype: str) -> "BaseAnswers":
        key = hashlib.sha256(f"{fingerprint}|{quantization}|{dtype}|{MAX_ANSWER_TOKENS}|{TOP_K}".encode()).hexdigest()[:16]
        return cls(Path(cache_dir) / f"base-answers-{key}.json")

    def load(self) -> dict[str, BaseAnswer]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {p: BaseAnswer(**a) for p, a in raw.items()}

    def get(self, model, tokenizer, prompts: list[str]) -> dict[str, BaseAnswer]:
        """The base's answers (model: the base, no adapter), generating and caching the missing ones."""
        known = self.load()
        missing = [p for p in prompts if p not in known]
        if missing:
            rendered = [render(tokenizer, p) for p in missing]
            generated = greedy(model, tokenizer, rendered, MAX_ANSWER_TOKENS, batch_size=64)
            learned = [a.ids + ([tokenizer.eos_token_id] if a.finished else []) for a in generated]
            tops = teacher_top_k(model, rendered, learned)
            for p, a, (top_ids, top_logp) in zip(missing, generated, tops):
                known[p] = BaseAnswer(a.ids, a.finished, top_ids, top_logp)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # workers may share the folder: write, then rename
            tmp.write_text(json.dumps({p: dataclasses.asdict(a) for p, a in known.items()}))
            os.replace(tmp, self.path)
        return {p: known[p] for p in prompts}


def replay_examples(answers: dict[str, BaseAnswer], tokenizer, mode: str) -> list[dict]:
    """Training rows (same shape as data.tokenize's) from the base's answers. mode "replay":
    the ordinary loss on the answer; "kl": no ordinary loss, the KL term at the positions
    that predict the answer (`kl_start`: the first of them; `kl_ids` / `kl_logp`: the base's
    top-k there); "replay+kl": both."""
    eos = tokenizer.eos_token_id
    rows = []
    for prompt, a in answers.items():
        ids_prompt = render(tokenizer, prompt)
        answer = a.ids + ([eos] if a.finished else [])
        if not answer:
            continue
        ids = ids_prompt + answer
        learned = [-100] * len(ids_prompt) + answer
        row = {"input_ids": ids, "labels": learned if mode in ("replay", "replay+kl") else [-100] * len(ids)}
        if mode in ("kl", "replay+kl"):
            row |= {"kl_start": len(ids_prompt) - 1, "kl_ids": a.top_ids, "kl_logp": a.top_logp}
        rows.append(row)
    return rows
