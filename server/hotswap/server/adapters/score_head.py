"""Sequence-classification adapters (PEFT task_type SEQ_CLS): their score head and label names.

PEFT wraps the classifier of `AutoModelForSequenceClassification` in `modules_to_save`
(PeftModelForSequenceClassification adds "classifier" and "score" itself) and saves the
trained copy beside the adapter's own weights, under the head's path in the wrapped model:
`base_model.model.score.weight` for LoRA, `base_model.score.weight` for prompt learning
(PEFT 0.21). transformers' decoder-only classifiers are one linear, `score` (no bias for
Llama, Qwen, Mistral); a head of any other shape is refused.

Label names: transformers keeps `id2label` in the model's config.json, which PEFT does
not save. When a config.json sits beside the adapter (`model.config.save_pretrained(dir)`)
its id2label names the labels; otherwise they are transformers' defaults LABEL_0..N-1."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import AdapterIncompatible, InvalidArgument, shown
from .weights import ScoreHead

HEAD_NAMES = ("score", "classifier")
LABELS_FILE = "config.json"
MAX_LABELS = 1024
MAX_LABEL_CHARS = 128
MAX_LABELS_FILE_BYTES = 1 << 20
"""A config.json larger than this is not a model config."""

# "base_model.model.score.weight", "base_model.score.bias", "…score.modules_to_save.default.weight"
_KEY = re.compile(rf"^(base_model\.)?(model\.)?(?P<name>{'|'.join(HEAD_NAMES)})(\.modules_to_save(\.default)?)?\.(?P<part>weight|bias)$")
_HEAD_SUBMODULE = re.compile(rf"^(base_model\.)?(model\.)?({'|'.join(HEAD_NAMES)})\.")


def split_score_head(config: dict, tensors: dict[str, torch.Tensor], hidden_size: int, folder: Path | None) -> tuple[dict, dict, ScoreHead]:
    """(config without the head in modules_to_save, tensors without the head's, the head) of a SEQ_CLS adapter."""
    parts: dict[str, torch.Tensor] = {}
    rest = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            parts[m["part"]] = t
        elif _HEAD_SUBMODULE.match(key) and not key.endswith(("lora_A.weight", "lora_B.weight")):
            raise AdapterIncompatible(f"the classification head has a tensor {shown(key, 120)}: only a single linear "
                                      f"score head ({' or '.join(HEAD_NAMES)}) is supported", field="modules_to_save")
        else:
            rest[key] = t
    weight = parts.get("weight")
    if weight is None:
        raise AdapterIncompatible("a SEQ_CLS adapter must carry its score head (modules_to_save 'score' or 'classifier'); "
                                  f"no such tensor among {sorted(tensors)[:4]}", field="modules_to_save")
    if weight.dim() != 2 or weight.shape[1] != hidden_size or not 1 <= weight.shape[0] <= MAX_LABELS:
        raise AdapterIncompatible(f"score head weight {list(weight.shape)}: must be [num_labels (1..{MAX_LABELS}), "
                                  f"hidden size {hidden_size}]", field="hidden_size")
    bias = parts.get("bias")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise AdapterIncompatible(f"score head bias {list(bias.shape)} does not match its {weight.shape[0]} labels", field="modules_to_save")
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(s, str) for s in saved)):
        raise InvalidArgument(f"must be a list of module names, got {shown(saved, 80)}", field="modules_to_save")
    others = [s for s in saved or [] if s not in HEAD_NAMES]
    config = {**config, "modules_to_save": others or None}
    labels = read_label_names(folder, weight.shape[0]) if folder is not None else None
    head = ScoreHead(weight.float(), None if bias is None else bias.float(),
                     labels or [f"LABEL_{i}" for i in range(weight.shape[0])])
    return config, rest, head


def read_label_names(folder: Path, num_labels: int) -> list[str] | None:
    """id2label from a config.json beside the adapter, in label order; None without one."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_LABELS_FILE_BYTES:
        raise InvalidArgument(f"{LABELS_FILE} beside the adapter has {path.stat().st_size} bytes; at most {MAX_LABELS_FILE_BYTES}", field="id2label")
    try:
        id2label = json.loads(path.read_text()).get("id2label")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise InvalidArgument(f"{LABELS_FILE} beside the adapter is not a JSON object: {e}", field="id2label") from None
    if id2label is None:
        return None
    if not isinstance(id2label, dict):
        raise InvalidArgument(f"must map label ids to names, got {shown(id2label, 80)}", field="id2label")
    names: dict[int, str] = {}
    for k, v in id2label.items():
        if not (isinstance(k, str) and k.isdigit() and isinstance(v, str) and 0 < len(v) <= MAX_LABEL_CHARS):
            raise InvalidArgument(f"entry {shown(k, 40)}: {shown(v, 80)} must be a label id and a name of 1 to "
                                  f"{MAX_LABEL_CHARS} characters", field="id2label")
        names[int(k)] = v
    if all(v == f"LABEL_{k}" for k, v in names.items()):
        return None  # transformers' placeholder names (e.g. a base model's config.json): they name no head
    if sorted(names) != list(range(num_labels)):
        raise AdapterIncompatible(f"names labels {sorted(names)[:8]}, but the score head has {num_labels} labels "
                                  f"(ids 0..{num_labels - 1})", field="id2label")
    return [names[i] for i in range(num_labels)]
