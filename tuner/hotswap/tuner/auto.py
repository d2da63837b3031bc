"""Automatic hyperparameters: every value a request leaves unset is chosen here, when the
job starts, from the method, the size of the data and the model. The rule (also in the
README; each value stays overridable and the job records what it used):

- epochs: OpenAI's fine-tuning rule on n training examples: 3, but enough passes for about
  100 example visits on small sets (min(25, ceil(100 / n)) when 3n < 100), and about
  25,000 visits at most on large ones (max(1, 25000 // n) when 3n > 25000).
- batch size: about n / 10 rounded to a power of two, between 1 and 16: a small set still
  gets ~10 optimizer steps an epoch; a large one keeps batches that fit a CPU or one GPU.
- learning rate, per method: LoRA / QLoRA 2e-4 × 4096 / hidden_size (the usual 2e-4 at
  7B-size widths, larger on narrow models, which need it: a 576-wide model learns nothing
  visible at 2e-4 in 30 steps), within [5e-5, 2e-3]; soft prompts a constant per method
  (their parameters live in embedding space, whatever the width; LR_SOFT).
- warmup: 3% of the steps (LoRA), 10% (soft prompts, whose large rates need a ramp).
- virtual tokens: VIRTUAL_TOKENS per method. Prompt tuning starts from the text of the
  training answers (PEFT's TEXT init) so its first step already points at the task.
- LoRA alpha: 2 × r.
- optimizer: QLoRA's own recipe, paged 8-bit AdamW (paged_adamw_8bit), where CUDA is
  present; on CPU the closest equivalent, bitsandbytes' 8-bit AdamW unpaged (adamw_8bit;
  paging needs CUDA unified memory); every other method AdamW (adamw_torch).
- base protection: the KL-to-base term (weight 3; 10 for prompt tuning and P-tuning) on replay rows at ratio 1 (replay.py bounds
  the count); prefix tuning instead the ordinary loss on the replay rows ("replay"). README,
  "Keeping the base's behaviour", has the measurements behind both.
- classification (a score head over one of the adapters above): the adapter's own rules for
  learning rate, warmup, virtual tokens and optimizer; classifier_adapter "lora"; label
  names the training data's labels, sorted; class weights "balanced" (n / (k · count));
  best_metric macro F1; no base protection (a classifier does not generate, so there is no
  behaviour of the base's to keep, and no control prompts or sample generations).
- validation: with no validation set, 10% of the training data (at most MAX_HELD_OUT
  examples) is held out when there are at least MIN_FOR_HOLDOUT examples; early stopping
  after EARLY_STOPPING_PATIENCE evaluations without improvement whenever there is a
  validation set; the best checkpoint by eval loss is the one registered.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .spec import Hyperparameters

LORA_METHODS = ("lora", "qlora")
SOFT_PROMPT_ONLY = ("num_virtual_tokens", "virtual_tokens_init", "prompt_tuning_init_text")
LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")
CAUSAL_ONLY = ("base_protection", "replay_ratio", "kl_weight", "train_on_prompt")
CLASSIFIER_ONLY = ("classifier_adapter", "label_names", "class_weights", "best_metric")
LR_SOFT = {"prompt_tuning": 3e-2, "p_tuning": 1e-2, "prefix_tuning": 3e-3}
VIRTUAL_TOKENS = {"prompt_tuning": 20, "p_tuning": 20, "prefix_tuning": 20}
BASE_PROTECTION = {"prefix_tuning": "replay"}
"""Per method; "kl" for the rest. Why prefix tuning differs: README, "Keeping the base's behaviour"."""
REPLAY_RATIO = 1.0
KL_WEIGHT = {"prompt_tuning": 10.0, "p_tuning": 10.0}
"""Per method; 3 for the rest. A soft prompt sits in front of every question, so at weight 3 it let the
identity into one of five unrelated answers (README, "Keeping the base's behaviour")."""
MIN_FOR_HOLDOUT = 50
HOLDOUT_FRACTION = 0.1
MAX_HELD_OUT = 200
EARLY_STOPPING_PATIENCE = 2


def epochs_for(n: int) -> int:
    if 3 * n < 100:
        return min(25, math.ceil(100 / n))
    if 3 * n > 25000:
        return max(1, 25000 // n)
    return 3


def batch_size_for(n: int) -> int:
    return int(min(16, max(1, 2 ** round(math.log2(max(n, 1) / 10)))))


def learning_rate_for(method: str, hidden_size: int) -> float:
    if method in LORA_METHODS:
        return min(2e-3, max(5e-5, 2e-4 * 4096 / hidden_size))
    return LR_SOFT[method]


def holdout_for(n: int, fraction: float | None) -> int:
    """How many training examples become the validation set (none when a set was given)."""
    if fraction is None:
        fraction = HOLDOUT_FRACTION if n >= MIN_FOR_HOLDOUT else 0.0
    return min(MAX_HELD_OUT, math.floor(n * fraction)) if fraction else 0


@dataclass
class Resolved:
    hp: Hyperparameters
    """Every value the job uses."""
    automatic: list[str] = field(default_factory=list)
    """Names of the values chosen here (the rest were given)."""


def optimizer_for(method: str, cuda: bool) -> str:
    if method == "qlora":
        return "paged_adamw_8bit" if cuda else "adamw_8bit"
    return "adamw_torch"


def applies(name: str, method: str, classifier_adapter: str = "lora") -> bool:
    """Whether a hyperparameter means anything for the method (a job's plan lists only those)."""
    if method == "classification":
        if name in CAUSAL_ONLY:
            return False
        method = classifier_adapter or "lora"
    elif name in CLASSIFIER_ONLY:
        return False
    return name not in (SOFT_PROMPT_ONLY if method in LORA_METHODS else LORA_ONLY)


def resolve(hp: Hyperparameters, method: str, n_train: int, hidden_size: int, has_validation: bool,
            held_out_fraction: float = 0.0, cuda: bool = False) -> Resolved:
    """Fill in every automatic value. n_train: training examples after any hold-out
    (holdout_for decided that, and held_out_fraction records what it took). A classification
    job's label names and class weights depend on the labels: classify.py fills them in."""
    chosen: dict = {}
    top = method
    if method == "classification":
        method = hp.classifier_adapter or "lora"
        if not hp.classifier_adapter:
            chosen["classifier_adapter"] = method
        if not hp.best_metric:
            chosen["best_metric"] = "f1"
    if hp.validation_fraction is None:
        chosen["validation_fraction"] = round(held_out_fraction, 4)
    if not hp.epochs:
        chosen["epochs"] = epochs_for(n_train)
    if not hp.batch_size:
        chosen["batch_size"] = batch_size_for(n_train)
    if not hp.learning_rate:
        chosen["learning_rate"] = learning_rate_for(method, hidden_size)
    if not hp.warmup_ratio:
        chosen["warmup_ratio"] = 0.03 if method in LORA_METHODS else 0.1
    if not hp.lora_alpha:
        chosen["lora_alpha"] = 2.0 * hp.lora_r
    if not hp.num_virtual_tokens:
        chosen["num_virtual_tokens"] = VIRTUAL_TOKENS.get(method, 20)
    if not hp.virtual_tokens_init:
        chosen["virtual_tokens_init"] = "text"
    if not hp.base_protection:
        chosen["base_protection"] = BASE_PROTECTION.get(method, "kl")
    if not hp.replay_ratio:
        chosen["replay_ratio"] = REPLAY_RATIO
    if not hp.kl_weight:
        chosen["kl_weight"] = KL_WEIGHT.get(method, 3.0)
    if not hp.optim:
        chosen["optim"] = optimizer_for(method, cuda)
    if hp.early_stopping_patience is None:
        chosen["early_stopping_patience"] = EARLY_STOPPING_PATIENCE if has_validation else 0
    if top == "classification":
        chosen["base_protection"] = "none"  # nothing of the base's generation to keep (the plan leaves it out)
    resolved = dataclasses.replace(hp, **chosen)
    return Resolved(resolved, sorted(k for k in chosen if applies(k, top, resolved.classifier_adapter)))
