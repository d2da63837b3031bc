"""Training data: read examples (inline, or JSONL/CSV/Parquet from a path or fsspec
URL through `datasets`), recognise their shape, and tokenize them with loss on
the completion only (assistant turns for chat; everything for plain text). EOS
stays in the labels so the trained adapter learns to stop.

Shapes (one per dataset): chat `messages`; `prompt`/`completion`; alpaca
`instruction`/`input`/`output`; plain `text`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from hotswap.server.errors import InvalidArgument

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FORMATS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Tokenized:
    examples: list[dict] = field(default_factory=list)
    """{"input_ids": [...], "labels": [...]} with -100 where no loss is taken."""
    warnings: list[str] = field(default_factory=list)
    tokens: int = 0


def read_examples(source: dict, field_name: str) -> list[dict]:
    """source: {"inline": [examples]} or {"uri": "path-or-url"}."""
    if "inline" in source:
        examples = list(source["inline"])
    elif source.get("uri"):
        examples = _read_uri(source["uri"], field_name)
    else:
        raise InvalidArgument("give inline examples or a uri", field=field_name)
    if not examples:
        raise InvalidArgument("the dataset is empty", field=field_name)
    return examples


def _read_uri(uri: str, field_name: str) -> list[dict]:
    import datasets

    suffix = PurePosixPath(uri.split("?")[0]).suffix.lower()
    kind = READERS.get(suffix)
    if kind is None:
        raise InvalidArgument(f"unknown data file type {suffix or '(none)'!r}; use .jsonl, .json, .csv or .parquet", field=f"{field_name}.uri")
    if kind == "json":
        _check_jsonl(uri, field_name)
    try:
        ds = datasets.load_dataset(kind, data_files=uri, split="train")
    except FileNotFoundError as e:
        raise InvalidArgument(f"cannot read {uri!r}: {e}", field=f"{field_name}.uri") from None
    except Exception as e:  # noqa: BLE001 - datasets wraps parser errors in its own types
        raise InvalidArgument(f"cannot read {uri!r}: {type(e).__name__}: {e}", field=f"{field_name}.uri") from None
    return ds.to_list()


def _check_jsonl(uri: str, field_name: str) -> None:
    """datasets' JSON reader reports a parse error without the line; find it first."""
    import fsspec

    try:
        with fsspec.open(uri, "rt", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InvalidArgument(f"no data file at {uri!r}", field=f"{field_name}.uri") from None
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{uri!r} is not UTF-8 text (byte {e.start} of a chunk: {e.reason})", field=f"{field_name}.uri") from None
    except Exception as e:  # noqa: BLE001 - each filesystem (http, s3, ...) raises its own errors
        raise InvalidArgument(f"cannot read {uri!r}: {type(e).__name__}", field=f"{field_name}.uri") from None
    if uri.endswith(".json") and text.lstrip().startswith("["):
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"line {n} of {uri} is not valid JSON: {e.msg}", field=f"{field_name}.uri") from None
        if not isinstance(obj, dict):
            raise InvalidArgument(f"line {n} of {uri} is not a JSON object", field=f"{field_name}.uri")


def detect_format(examples: list[dict], field_name: str) -> str:
    first = examples[0]
    fmt = next((f for f, cols in FORMATS.items() if all(first.get(c) not in (None, "", []) for c in cols)), None)
    if fmt is None:
        raise InvalidArgument(
            f"example 1 has columns {sorted(k for k, v in first.items() if v not in (None, '', []))}; expected one of "
            + "; ".join("/".join(c) for c in FORMATS.values()),
            field=field_name,
        )
    for i, ex in enumerate(examples, 1):
        missing = [c for c in FORMATS[fmt] if ex.get(c) in (None, "", [])]
        if missing:
            raise InvalidArgument(f"example {i} lacks {', '.join(missing)} (the dataset's shape is {fmt})", field=field_name)
    return fmt


def segments(example: dict, fmt: str, tokenizer) -> list[tuple[str, bool]]:
    """The example as (text, takes loss) pieces, in order."""
    eos = tokenizer.eos_token or ""
    if fmt == "text":
        return [(example["text"] + eos, True)]
    if fmt == "prompt_completion":
        return [(example["prompt"], False), (example["completion"] + eos, True)]
    if fmt == "alpaca":
        template = ALPACA_WITH_INPUT if example.get("input") else ALPACA
        return [(template.format(instruction=example["instruction"], input=example.get("input", "")), False), (example["output"] + eos, True)]
    msgs = [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
    if not tokenizer.chat_template:
        raise InvalidArgument("chat examples need a model with a chat template", field="train")
    # Render the conversation up to each assistant turn: the growth of the rendered
    # text at that turn is what the assistant said (plus its end-of-turn token).
    out, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise InvalidArgument("the chat template does not render turns incrementally; use prompt/completion", field="train")
        out += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    if not any(takes for _, takes in out):
        raise InvalidArgument("a chat example has no assistant turn to learn from", field="train")
    return out


def tokenize(examples: list[dict], fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool, field_name: str) -> Tokenized:
    out = Tokenized()
    truncated = dropped = 0
    for ex in examples:
        ids, labels = [], []
        for text, takes_loss in segments(ex, fmt, tokenizer):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if (takes_loss or train_on_prompt) else [-100] * len(piece)
        if len(ids) > max_seq_len:
            truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(t == -100 for t in labels):
            dropped += 1
            continue
        out.examples.append({"input_ids": ids, "labels": labels})
        out.tokens += len(ids)
    if not out.examples:
        raise InvalidArgument(
            f"every example would be truncated to max_seq_len {max_seq_len} before its completion; raise max_seq_len", field=field_name)
    if truncated:
        out.warnings.append(f"{truncated} of {len(examples)} examples in {field_name} were longer than max_seq_len {max_seq_len} and were truncated"
                            + (f"; {dropped} lost their whole completion and were dropped" if dropped else ""))
    return out


def hold_out(examples: list[dict], count: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): `count` examples drawn at random (seeded) become the validation set."""
    if count <= 0:
        return examples, []
    picked = set(random.Random(seed).sample(range(len(examples)), count))
    return [e for i, e in enumerate(examples) if i not in picked], [e for i, e in enumerate(examples) if i in picked]
