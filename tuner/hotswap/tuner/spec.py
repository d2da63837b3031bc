"""What a training job is asked to do, with the defaults a PEFT user expects, and
the checks that run at submit time (before a job is even queued)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hotswap.server.adapters.registry import check_adapter_name
from hotswap.server.errors import AdapterIncompatible, InvalidArgument

METHODS = ("lora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Soft prompts need a much larger step than LoRA to move (PEFT's own examples use 3e-2 / 1e-2).
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "prompt_tuning": 3e-2, "p_tuning": 3e-2, "prefix_tuning": 1e-2}


@dataclass
class Hyperparameters:
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION))
    """Module names, or ["all-linear"]."""
    num_virtual_tokens: int = 20
    prompt_tuning_init_text: str = ""
    learning_rate: float = 0.0
    """0: the method's default (2e-4 LoRA, 3e-2 prompt tuning / P-tuning, 1e-2 prefix tuning)."""
    epochs: int = 3
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_seq_len: int = 512
    warmup_ratio: float = 0.03
    seed: int = 42
    train_on_prompt: bool = False
    early_stopping_patience: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "Hyperparameters":
        """Zero / empty values mean "default" (proto3 cannot tell unset from 0)."""
        base = cls()
        kw = {}
        for f in dataclasses.fields(cls):
            v = d.get(f.name)
            if v not in (None, 0, 0.0, "", []):
                kw[f.name] = list(v) if isinstance(v, (list, tuple)) else v
        hp = dataclasses.replace(base, **kw)
        checks = [
            (hp.lora_r >= 1, "lora_r", "must be at least 1"),
            (hp.lora_alpha > 0, "lora_alpha", "must be > 0"),
            (0 <= hp.lora_dropout < 1, "lora_dropout", "must be in [0, 1)"),
            (1 <= hp.num_virtual_tokens <= 512, "num_virtual_tokens", "must be 1..512"),
            (hp.learning_rate >= 0, "learning_rate", "must be > 0"),
            (1 <= hp.epochs <= 1000, "epochs", "must be 1..1000"),
            (1 <= hp.batch_size <= 1024, "batch_size", "must be 1..1024"),
            (1 <= hp.gradient_accumulation_steps <= 1024, "gradient_accumulation_steps", "must be 1..1024"),
            (8 <= hp.max_seq_len <= 32768, "max_seq_len", "must be 8..32768"),
            (0 <= hp.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
            (all(isinstance(t, str) and t for t in hp.target_modules), "target_modules", "must be module names"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise InvalidArgument(f"{msg}, got {getattr(hp, name)!r}", field=f"hyperparameters.{name}")
        return hp

    def lr(self, method: str) -> float:
        return self.learning_rate or DEFAULT_LR[method]


@dataclass
class TrainSpec:
    adapter_name: str
    method: str
    train: dict
    """{"inline": [examples]} or {"uri": "..."}."""
    validation: dict | None = None
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSpec":
        check_adapter_name(d.get("adapter_name", ""), "adapter_name")
        method = d.get("method", "")
        if method not in METHODS:
            raise InvalidArgument(f"unknown training method {method!r}; use one of {', '.join(METHODS)}", field="method")
        for name in ("train", "validation"):
            src = d.get(name)
            if src is None and name == "validation":
                continue
            if not isinstance(src, dict) or not (src.get("inline") or src.get("uri")):
                raise InvalidArgument("give inline examples or a uri" + (" (the dataset is empty)" if isinstance(src, dict) and "inline" in src else ""),
                                      field=name)
        hp = d.get("hyperparameters") or {}
        hp = hp if isinstance(hp, Hyperparameters) else Hyperparameters.from_dict(hp)
        return cls(d["adapter_name"], method, d["train"], d.get("validation"), hp, dict(d.get("labels") or {}))


def check_against_base(spec: TrainSpec, linear_names: set[str], max_lora_rank: int) -> None:
    """Whatever the job produces must be servable: rank within the server's limit,
    LoRA targets that exist in the base. Raises FAILED_PRECONDITION otherwise."""
    hp = spec.hyperparameters
    if spec.method in ("lora", "qlora"):
        if hp.lora_r > max_lora_rank:
            raise AdapterIncompatible(f"lora_r {hp.lora_r} is above the server's maximum LoRA rank {max_lora_rank}", field="hyperparameters.lora_r")
        if hp.target_modules != ["all-linear"]:
            missing = sorted(set(hp.target_modules) - linear_names)
            if missing:
                raise AdapterIncompatible(f"target modules absent from the base model: {', '.join(missing)} (it has {', '.join(sorted(linear_names))})",
                                          field="hyperparameters.target_modules")


def linear_names(model) -> set[str]:
    """Short names of the base's linear layers a LoRA can target (not the output head)."""
    from torch import nn

    head = model.get_output_embeddings()
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
