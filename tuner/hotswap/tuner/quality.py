"""What a job learned and what it changed elsewhere: sample generations before and after
training on a few validation prompts and on the built-in control prompts, and the
quality report of a finished job.

- "changed": a control answer whose first CHANGED_TOKENS tokens differ from the base's
  (greedy, same batch both times, so only the adapter can make them differ). The start
  is where an adapter that over-generalises shows (its own answer instead of the base's);
  later tokens of a long greedy answer drift at the smallest nudge and say little.
- "agreement": teacher-forced on the base's whole answers to the control prompts, the
  share of positions where the adapter's most likely next token is the base's most likely
  one — 1.0 is the base's behaviour exactly, and it moves smoothly where "changed" flips.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .data import segments
from .general_prompts import CONTROL
from .generation import Answer, greedy, render
from .replay import MAX_ANSWER_TOKENS

SAMPLE_TOKENS = MAX_ANSWER_TOKENS
"""As long as the base's cached answers, so a control prompt's before and after compare like with like."""
CHANGED_TOKENS = 16
VALIDATION_SAMPLES = 3


@dataclass
class Sample:
    kind: str
    """"validation" (a held-out or given validation example), "train" (no validation set) or "control"."""
    prompt: str
    reference: str = ""
    """The example's expected answer (validation / train)."""
    before: str = ""
    after: str = ""


@dataclass
class QualityReport:
    train_loss: float | None = None
    """Loss of the registered adapter on the training examples (replay rows not included)."""
    eval_loss: float | None = None
    """Loss of the registered adapter on the validation set, when there is one."""
    control_changed: float = 0.0
    control_agreement: float = 1.0
    control_prompts: int = 0
    samples: list[Sample] = field(default_factory=list)
    classification: dict | None = None
    """Classifiers: {"split", "label_names", "accuracy", "precision", "recall", "f1", "per_label", "confusion"}
    of the registered checkpoint (classify_metrics.Scores)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SamplePrompt:
    kind: str
    shown: str
    """The prompt as a person reads it (the last user turn for chat)."""
    ids: list[int]
    reference: str


def example_prompts(examples: list[dict], fmt: str, tokenizer, kind: str, n: int = VALIDATION_SAMPLES) -> list[SamplePrompt]:
    """The first n examples as prompts (everything before their last learned piece) with that piece as the reference."""
    out = []
    eos = tokenizer.eos_token or ""
    for ex in examples[:n]:
        pieces = segments(ex, fmt, tokenizer)
        last = max(i for i, (_, takes) in enumerate(pieces) if takes)
        prompt, reference = "".join(t for t, _ in pieces[:last]), pieces[last][0]
        if not prompt:  # plain text: its first third leads, the rest is the reference
            words = reference.split(" ")
            cut = max(1, len(words) // 3)
            prompt, reference = " ".join(words[:cut]), " " + " ".join(words[cut:])
        reference = reference.split(eos)[0] if eos else reference
        if fmt == "messages":
            shown = next(m["content"] for m in reversed(ex["messages"][:_last_assistant(ex["messages"])]) if m["role"] == "user")
        elif fmt == "alpaca":
            shown = ex["instruction"] + (f"\n{ex['input']}" if ex.get("input") else "")
        else:
            shown = prompt
        out.append(SamplePrompt(kind, shown, tokenizer(prompt, add_special_tokens=False)["input_ids"], reference.strip()))
    return out


def _last_assistant(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def control_prompts(tokenizer) -> list[SamplePrompt]:
    return [SamplePrompt("control", p, render(tokenizer, p), "") for p in CONTROL]


def generate(model, tokenizer, prompts: list[SamplePrompt]) -> list[Answer]:
    """Control prompts as one batch of their own, the others as another, so a control
    prompt's padding is the same before and after training."""
    ctrl = [p for p in prompts if p.kind == "control"]
    rest = [p for p in prompts if p.kind != "control"]
    answers = dict(zip(map(id, rest), greedy(model, tokenizer, [p.ids for p in rest], SAMPLE_TOKENS))) if rest else {}
    if ctrl:
        answers |= dict(zip(map(id, ctrl), greedy(model, tokenizer, [p.ids for p in ctrl], SAMPLE_TOKENS)))
    return [answers[id(p)] for p in prompts]


@torch.inference_mode()
def top1(model, prompts: list[SamplePrompt], answers: list[Answer]) -> list[list[int]]:
    """Teacher-forced on each answer: the model's most likely token at each of its positions."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for p, a in zip(prompts, answers):
            ids = torch.tensor([p.ids + a.ids], device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(a.ids) - 1:-1]  # [len(a), V]
            out.append(logits.argmax(-1).tolist() if a.ids else [])
    finally:
        model.train(was_training)
    return out


def agreement(base_top1: list[list[int]], adapter_top1: list[list[int]]) -> float:
    same = sum(x == y for b, a in zip(base_top1, adapter_top1) for x, y in zip(b, a))
    total = sum(len(b) for b in base_top1)
    return same / total if total else 1.0


def report(prompts: list[SamplePrompt], before: list[Answer], after: list[Answer], tokenizer, agreement_: float,
           train_loss: float | None, eval_loss: float | None) -> QualityReport:
    decode = lambda a: tokenizer.decode(a.ids, skip_special_tokens=True)  # noqa: E731
    samples = [Sample(p.kind, p.shown, p.reference, decode(b), decode(a)) for p, b, a in zip(prompts, before, after)]
    ctrl = [(b, a) for p, b, a in zip(prompts, before, after) if p.kind == "control"]
    changed = sum(b.ids[:CHANGED_TOKENS] != a.ids[:CHANGED_TOKENS] for b, a in ctrl)
    return QualityReport(train_loss=train_loss, eval_loss=eval_loss, control_changed=changed / len(ctrl) if ctrl else 0.0,
                         control_agreement=agreement_, control_prompts=len(ctrl), samples=samples)
