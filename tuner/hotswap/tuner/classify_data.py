"""Classification data: examples with a `label` and one input (`text`, chat `messages` or
`prompt`), their label names and class weights, and their tokens.

The tokens are exactly what the Classify server feeds a classifier, so training sees what
serving sees: `text` / `prompt` through the tokenizer with its special tokens; `messages`
rendered with the chat template (no generation prompt: a classifier reads the conversation
as it stands) and tokenized without adding any. Trailing pad tokens are dropped (transformers
pools the last non-pad token; the server pools the row's last one: they agree only without
them). An input longer than max_seq_len keeps its END: the score head reads the last token,
and a multiple-choice question puts the question and options last.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from hotswap.server.errors import InvalidArgument, shown

from .spec import check_label_names

INPUTS = ("text", "messages", "prompt")
_INT = re.compile(r"^-?\d+$")


@dataclass
class Labelled:
    examples: list[dict] = field(default_factory=list)
    """{"input_ids": [...], "labels": label id}."""
    warnings: list[str] = field(default_factory=list)
    tokens: int = 0


def label_text(example: dict, i: int, field_name: str) -> str:
    """The example's label as text (JSONL and Parquet may carry integers)."""
    v = example.get("label")
    if v is None or isinstance(v, (dict, list)) or (isinstance(v, float) and v != v) or str(v).strip() == "":
        raise InvalidArgument(f"example {i} has no label (classification examples need a label beside text, messages or prompt)",
                              field=field_name)
    if isinstance(v, float) and v.is_integer():  # pandas reads an integer column with a gap as floats
        v = int(v)
    return str(v).strip() if not isinstance(v, bool) else str(v).lower()


def input_of(example: dict, i: int, field_name: str) -> str:
    """Which input the example gives (exactly one of INPUTS)."""
    given = [k for k in INPUTS if example.get(k) not in (None, "", [])]
    if len(given) != 1:
        raise InvalidArgument(f"example {i} gives {' and '.join(given) or 'no input'}; a classification example gives exactly one of "
                              f"{', '.join(INPUTS)} (and a label)", field=field_name)
    return given[0]


def check_examples(examples: list[dict], field_name: str) -> None:
    """The shape checks that need no tokenizer (also run at submit for inline examples)."""
    for i, ex in enumerate(examples, 1):
        if not isinstance(ex, dict):
            raise InvalidArgument(f"example {i} is not an object", field=field_name)
        input_of(ex, i, field_name)
        label_text(ex, i, field_name)


def label_names_for(labels: list[str]) -> list[str]:
    """The automatic label names: the distinct labels, sorted (numerically when all are integers,
    so "10" comes after "9" and ids follow the numbers)."""
    distinct = set(labels)
    if all(_INT.match(x) for x in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def label_ids(labels: list[str], names: list[str], field_name: str) -> list[int]:
    """Each label's id: its position in names, or the label read as an index (a dataset may give
    0..k-1 while the names are words). Unknown labels name the example."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, lab in enumerate(labels, 1):
        if lab in index:
            out.append(index[lab])
        elif _INT.match(lab) and 0 <= int(lab) < len(names):
            out.append(int(lab))
        else:
            raise InvalidArgument(f"example {i} has label {shown(lab, 40)}, not one of label_names ({shown(', '.join(names), 200)}) "
                                  f"nor an index 0..{len(names) - 1}", field=field_name)
    return out


def balanced_weights(ids: list[int], k: int) -> list[float]:
    """sklearn's "balanced" class weights, n / (k · count): every label contributes the same total
    weight to the loss however rare it is (the ReClor recipe's weighted cross-entropy). A label with
    no training example gets 1.0 (there is nothing to balance). Ten lines; not worth a dependency."""
    counts = Counter(ids)
    n = len(ids)
    return [round(n / (k * counts[c]), 6) if counts[c] else 1.0 for c in range(k)]


def classes(labels: list[str], given_names: list[str], field_name: str = "train") -> tuple[list[str], list[int]]:
    """(label names, label ids of the examples); at least two labels must occur."""
    names = given_names or label_names_for(labels)
    if not given_names:
        check_label_names(names, field_name)  # automatic names meet the same limits as given ones
    ids = label_ids(labels, names, field_name)
    if len(set(ids)) < 2:
        raise InvalidArgument(f"the training examples have {len(set(ids))} distinct label(s); a classifier needs at least 2", field=field_name)
    return names, ids


def check_inline(train: list[dict], validation: list[dict] | None, label_names: list[str], class_weights: list[float]) -> None:
    """At submit, what inline examples alone can tell: shapes, labels, the label count."""
    from .spec import check_class_weights

    check_examples(train, "train")
    names, _ = classes([label_text(ex, i, "train") for i, ex in enumerate(train, 1)], label_names, "train")
    check_class_weights(class_weights, names)
    if validation:
        check_examples(validation, "validation")
        label_ids([label_text(ex, i, "validation") for i, ex in enumerate(validation, 1)], names, "validation")


def render(example: dict, tokenizer, i: int, field_name: str) -> list[int]:
    kind = input_of(example, i, field_name)
    if kind != "messages":
        return tokenizer(str(example[kind]))["input_ids"]
    if not tokenizer.chat_template:
        raise InvalidArgument("chat examples need a model with a chat template; give text instead", field=field_name)
    msgs = example["messages"]
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise InvalidArgument(f"example {i}: messages must be objects with role and content", field=field_name)
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs], tokenize=False, add_generation_prompt=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize(examples: list[dict], ids: list[int], tokenizer, max_seq_len: int, field_name: str) -> Labelled:
    out = Labelled()
    pad = tokenizer.pad_token_id
    truncated = 0
    for i, (ex, label) in enumerate(zip(examples, ids), 1):
        toks = render(ex, tokenizer, i, field_name)
        while toks and toks[-1] == pad:
            toks.pop()
        if not toks:
            raise InvalidArgument(f"example {i} has no tokens (or only padding)", field=field_name)
        if len(toks) > max_seq_len:
            truncated += 1
            toks = toks[-max_seq_len:]
        out.examples.append({"input_ids": toks, "labels": label})
        out.tokens += len(toks)
    if truncated:
        out.warnings.append(f"{truncated} of {len(examples)} examples in {field_name} were longer than max_seq_len {max_seq_len}; "
                            "their last max_seq_len tokens were kept (the score head reads the last token)")
    return out


def stratified_hold_out(examples: list[dict], labels: list[str], count: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): `count` examples held out with each label's share kept
    (largest remainders), so a rare label still shows in the validation metrics."""
    import random

    if count <= 0:
        return list(range(len(examples))), []
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    share = {lab: count * len(ix) / len(labels) for lab, ix in by_label.items()}
    take = {lab: int(s) for lab, s in share.items()}
    for lab in sorted(share, key=lambda x: (take[x] - share[x], x))[: count - sum(take.values())]:
        take[lab] += 1
    held = set()
    for lab, ix in sorted(by_label.items()):
        held |= set(rng.sample(ix, min(take[lab], len(ix) - 1)))  # every label keeps a training example
    return [i for i in range(len(examples)) if i not in held], sorted(held)
