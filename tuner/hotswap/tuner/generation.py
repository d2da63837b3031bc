"""Greedy generation inside a training job: the base's answers to the general prompts
(replay.py) and the sample generations before and after training (quality.py).

A prompt is rendered the way the server renders a request: chat `messages` through
the model's chat template, plain text as is. Batches are left-padded for
transformers' `generate`; greedy, so a job's samples are reproducible."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Answer:
    ids: list[int]
    """The generated tokens, without the EOS that ended them."""
    finished: bool
    """True when the model ended the answer (EOS) within the token limit."""


def render(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt as the server would feed them: a user message (or a list of
    chat messages) through the chat template when the model has one, else the text."""
    if isinstance(prompt, str):
        if not tokenizer.chat_template:
            return tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prompt = [{"role": "user", "content": prompt}]
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


@torch.inference_mode()
def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16) -> list[Answer]:
    """Greedy answers to already-tokenized prompts, in batches (left-padded)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[Answer] = []
    try:
        # longest first: rows of similar length share a batch, so little padding
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        answers: dict[int, Answer] = {}
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad)
            for r, i in enumerate(rows):
                new = gen[r, width:].tolist()
                answers[i] = Answer(new[:new.index(eos)], True) if eos in new else Answer(new, False)
        out = [answers[i] for i in range(len(prompts))]
    finally:
        model.train(was_training)
    return out
