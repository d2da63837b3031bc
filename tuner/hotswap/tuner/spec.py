"""What a training job is asked to do, with the defaults a PEFT user expects, and
the checks that run at submit time (before a job is even queued)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from hotswap.server.adapters.registry import check_adapter_name, check_labels
from hotswap.server.errors import AdapterIncompatible, InvalidArgument, shown

ADAPTERS = ("lora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning")
METHODS = (*ADAPTERS, "classification")
"""A classification job trains one of ADAPTERS (classifier_adapter) with a score head."""
BEST_METRICS = ("f1", "accuracy", "precision", "recall", "eval_loss")
MAX_LABELS = 1024
MAX_LABEL_CHARS = 128
"""The Classify server's limits on a classifier's labels (score_head.py in the Classify change)."""
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROTECTIONS = ("replay", "kl", "replay+kl", "none")
VIRTUAL_TOKEN_INITS = ("text", "random")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")
"""transformers' names: AdamW; bitsandbytes' 8-bit AdamW; the same, paged (CUDA only)."""


@dataclass
class Hyperparameters:
    """What the user asked for. Zero / empty / None means "automatic": auto.py fills it in
    from the method, the data and the model when the job starts, and the job records the
    values it used (Job.plan)."""

    lora_r: int = 16
    lora_alpha: float = 0.0
    """0: 2 × lora_r."""
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION))
    """Module names, or ["all-linear"]."""
    num_virtual_tokens: int = 0
    virtual_tokens_init: str = ""
    """Soft prompts (prompt tuning, P-tuning, prefix tuning): "text" starts the virtual tokens from
    prompt_tuning_init_text (automatic: the training answers), "random" from PEFT's own init."""
    prompt_tuning_init_text: str = ""
    learning_rate: float = 0.0
    epochs: int = 0
    batch_size: int = 0
    gradient_accumulation_steps: int = 1
    max_seq_len: int = 512
    warmup_ratio: float = 0.0
    seed: int = 42
    train_on_prompt: bool = False
    early_stopping_patience: int | None = None
    """Evaluations without improvement before stopping; 0 is off; None: automatic."""
    base_protection: str = ""
    """How the base's behaviour outside the task is kept: "replay", "kl", "replay+kl" or "none"."""
    replay_ratio: float = 0.0
    """Replay rows per training row (replay.py's rule bounds the count)."""
    kl_weight: float = 0.0
    """Weight of the KL-to-base term ("kl", "replay+kl")."""
    validation_fraction: float | None = None
    """Share of the training data held out for validation when no validation set is given; 0: never; None: automatic."""
    optim: str = ""
    """One of OPTIMIZERS."""
    classifier_adapter: str = ""
    """Classification: one of ADAPTERS under the score head; "" is "lora"."""
    label_names: list[str] = field(default_factory=list)
    """Classification: label names in label-id order; empty: the training data's labels, sorted."""
    class_weights: list[float] = field(default_factory=list)
    """Classification: cross-entropy weight per label; empty: "balanced" (classify_data.balanced_weights)."""
    best_metric: str = ""
    """Classification: one of BEST_METRICS; "" is "f1" (macro)."""

    @classmethod
    def from_dict(cls, d: dict) -> "Hyperparameters":
        """Zero / empty values mean "automatic" (proto3 cannot tell unset from 0), except for
        the fields that are optional on the wire (seed, early_stopping_patience, validation_fraction)."""
        kw = {}
        for f in dataclasses.fields(cls):
            v = d.get(f.name)
            explicit = f.name in ("early_stopping_patience", "validation_fraction") and v is not None
            if explicit or v not in (None, 0, 0.0, "", []):
                kw[f.name] = list(v) if isinstance(v, (list, tuple)) else v
        hp = dataclasses.replace(cls(), **kw)
        checks = [
            (hp.lora_r >= 1, "lora_r", "must be at least 1"),
            (0 <= hp.lora_alpha < math.inf, "lora_alpha", "must be a finite number > 0"),
            (0 <= hp.lora_dropout < 1, "lora_dropout", "must be in [0, 1)"),
            (0 <= hp.num_virtual_tokens <= 512, "num_virtual_tokens", "must be 1..512"),
            (hp.virtual_tokens_init in ("", *VIRTUAL_TOKEN_INITS), "virtual_tokens_init", f"must be one of {', '.join(VIRTUAL_TOKEN_INITS)}"),
            (0 <= hp.learning_rate < math.inf, "learning_rate", "must be a finite number > 0"),
            (0 <= hp.epochs <= 1000, "epochs", "must be 1..1000"),
            (0 <= hp.batch_size <= 1024, "batch_size", "must be 1..1024"),
            (1 <= hp.gradient_accumulation_steps <= 1024, "gradient_accumulation_steps", "must be 1..1024"),
            (8 <= hp.max_seq_len <= 32768, "max_seq_len", "must be 8..32768"),
            (0 <= hp.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
            (all(isinstance(t, str) and t for t in hp.target_modules), "target_modules", "must be module names"),
            (hp.early_stopping_patience is None or 0 <= hp.early_stopping_patience <= 1000, "early_stopping_patience", "must be 0..1000"),
            (hp.base_protection in ("", *PROTECTIONS), "base_protection", f"must be one of {', '.join(PROTECTIONS)}"),
            (0 <= hp.replay_ratio <= 100, "replay_ratio", "must be in [0, 100]"),
            (0 <= hp.kl_weight <= 1000, "kl_weight", "must be in [0, 1000]"),
            (hp.validation_fraction is None or 0 <= hp.validation_fraction <= 0.5, "validation_fraction", "must be in [0, 0.5]"),
            (hp.optim in ("", *OPTIMIZERS), "optim", f"must be one of {', '.join(OPTIMIZERS)}"),
            (hp.classifier_adapter in ("", *ADAPTERS), "classifier_adapter", f"must be one of {', '.join(ADAPTERS)}"),
            (hp.best_metric in ("", *BEST_METRICS), "best_metric", f"must be one of {', '.join(BEST_METRICS)}"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise InvalidArgument(f"{msg}, got {shown(getattr(hp, name))}", field=f"hyperparameters.{name}")
        check_label_names(hp.label_names)
        check_class_weights(hp.class_weights, hp.label_names)
        return hp


def check_label_names(names: list[str], field_name: str = "hyperparameters.label_names") -> None:
    """Label names the Classify server can return: distinct, non-empty, bounded."""
    if len(names) > MAX_LABELS:
        raise InvalidArgument(f"{len(names)} labels; at most {MAX_LABELS}", field=field_name)
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip() or len(n) > MAX_LABEL_CHARS or not n.isprintable():
            raise InvalidArgument(f"label {i} ({shown(n, 40)}) must be printable text of 1..{MAX_LABEL_CHARS} characters", field=field_name)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InvalidArgument(f"label {shown(dup, 40)} is named twice", field=field_name)
    if len(names) == 1:
        raise InvalidArgument("a classifier needs at least 2 labels", field=field_name)


def check_class_weights(weights: list[float], names: list[str], field_name: str = "hyperparameters.class_weights") -> None:
    """One finite weight > 0 per label (a zero weight would make a label impossible to learn)."""
    bad = next((w for w in weights if not (0 < w < math.inf)), None)
    if bad is not None:
        raise InvalidArgument(f"each weight must be a finite number > 0, got {shown(bad)}", field=field_name)
    if weights and names and len(weights) != len(names):
        raise InvalidArgument(f"{len(weights)} weights for {len(names)} label_names; give one per label", field=field_name)
    if len(weights) == 1:
        raise InvalidArgument("one weight per label, and a classifier has at least 2 labels", field=field_name)


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
        return cls(d["adapter_name"], method, d["train"], d.get("validation"), hp, check_labels(dict(d.get("labels") or {})))


def check_against_base(spec: TrainSpec, linear_names: set[str], max_lora_rank: int, cuda: bool = False, base=None) -> None:
    """Whatever the job produces must be servable: rank within the server's limit,
    LoRA targets that exist in the base (and that PEFT can convert, given `base`, the model);
    and it must be trainable here: paged optimizers page through CUDA unified memory.
    Raises FAILED_PRECONDITION otherwise."""
    hp = spec.hyperparameters
    if hp.optim.startswith("paged_") and not cuda:
        raise AdapterIncompatible(f"optim {hp.optim} pages optimizer state through CUDA memory and there is no CUDA device here; "
                                  "use adamw_8bit (the same 8-bit AdamW, not paged)", field="hyperparameters.optim")
    if adapter_of(spec) in ("lora", "qlora"):
        if hp.lora_r > max_lora_rank:
            raise AdapterIncompatible(f"lora_r {hp.lora_r} is above the server's maximum LoRA rank {max_lora_rank}", field="hyperparameters.lora_r")
        if hp.target_modules != ["all-linear"]:
            modules = set(hp.target_modules) if base is None else _module_targets(base, hp.target_modules)
            missing = sorted(modules - linear_names)
            if missing:
                raise AdapterIncompatible(f"target modules absent from the base model: {', '.join(missing)} (it has {', '.join(sorted(linear_names))})",
                                          field="hyperparameters.target_modules")


def _module_targets(base, target_modules: list[str]) -> set[str]:
    """The names PEFT leaves as module targets on `base`. PEFT >= 0.22 turns some into target_parameters on MoE models
    whose experts transformers v5 fuses (Mixtral's w1 / w2 / w3 and gate, Qwen2-MoE's gate; the server serves those
    adapters), and refuses one half of a fused weight (w1 without w3): its own conversion, run on a throwaway config,
    says which, before the job starts."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # PEFT < 0.22 converts nothing
        return set(target_modules)
    config = LoraConfig(target_modules=list(target_modules))
    try:
        convert_peft_config_for_transformers(config, base, None)
    except ValueError as e:
        raise AdapterIncompatible(f"PEFT cannot target these on this model: {e}", field="hyperparameters.target_modules") from e
    return set(config.target_modules or ())


def adapter_of(spec: TrainSpec) -> str:
    """The PEFT adapter type a job trains (a classifier's is its classifier_adapter)."""
    return (spec.hyperparameters.classifier_adapter or "lora") if spec.method == "classification" else spec.method


def linear_names(model) -> set[str]:
    """Short names of the base's linear layers a LoRA can target (not the output head)."""
    from torch import nn

    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    return names - {"score", "classifier"}  # a classifier's head is trained whole (modules_to_save), never a LoRA target
