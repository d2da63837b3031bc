"""Train a classifier (method "classification"): the base with a sequence-classification head
(AutoModelForSequenceClassification: a linear `score` over the last token's hidden state),
one PEFT adapter under it (task_type SEQ_CLS, so PEFT trains and saves the head through
modules_to_save), class-weighted cross-entropy, accuracy / precision / recall / F1 at every
evaluation, and the checkpoint best by the chosen metric registered with its label names
(config.json with id2label beside the adapter files, which the Classify server reads).

The causal methods' base protection (replay, KL), control prompts and sample generations
do not apply: a classifier generates nothing, and its head is new, so there is no base
behaviour of the same task to keep."""
from __future__ import annotations

import dataclasses
import json
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import prepare_model_for_kbit_training
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, set_seed

from hotswap.server.adapters import load as adapter_load
from hotswap.server.adapters.peft_files import CONFIG, WEIGHTS, read_adapter_dir
from hotswap.server.adapters.registry import AdapterRegistry
from hotswap.server.adapters.validate import BaseShape
from hotswap.server.adapters.weights import Adapter
from hotswap.server.config import ModelConfig
from hotswap.server.errors import AdapterIncompatible
from hotswap.server.model.loader import load_base_model
from hotswap.server.model.sources import resolve_checkpoint

from . import auto, classify_data, fit
from .classify_metrics import compute_metrics, scores
from .data import read_examples
from .jobs import Job, JobStore
from .methods import init_prefix_from_text, init_prompt_encoder_from_text, init_text, peft_config, wrap
from .progress import Progress
from .quality import QualityReport
from .spec import TrainSpec, adapter_of, check_against_base, check_class_weights, linear_names

REPORT_ROWS = 256
"""Without a validation set, evaluations and the report use at most this many training examples."""
HEAD = ("score", "classifier")


class Collator:
    """Right-pads input ids with the pad id (transformers' classifiers pool the last non-pad token)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        n = max(len(x["input_ids"]) for x in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, :len(x["input_ids"])] = torch.tensor(x["input_ids"])
            mask[i, :len(x["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([x["labels"] for x in batch])}


class WeightedTrainer(Trainer):
    """Cross-entropy with a weight per class (torch's weighted mean: Σ w_y·CE / Σ w_y, as
    nn.CrossEntropyLoss(weight=...) in the ReClor recipe)."""

    def __init__(self, *args, class_weights: list[float], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.class_weights = torch.tensor(class_weights, dtype=torch.float32)
        self.model_accepts_loss_kwargs = False  # the loss is a per-batch mean: let the Trainer divide by accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")  # [B]
        logits = model(**inputs, use_cache=False).logits.float()  # [B, k]
        loss = F.cross_entropy(logits, labels, weight=self.class_weights.to(logits.device))
        # only the logits: the Trainer's eval loop would otherwise gather the KV cache as "predictions"
        return (loss, {"logits": logits}) if return_outputs else loss


@dataclasses.dataclass
class Data:
    names: list[str]
    weights: list[float]
    train: list[dict]
    valid: list[dict]
    held_out: bool
    warnings: list[str]


def prepare(spec: TrainSpec, tokenizer, max_seq_len: int) -> Data:
    """Read, label, split and tokenize; every data problem names the field and the example."""
    hp = spec.hyperparameters
    train_raw = read_examples(spec.train, "train")
    classify_data.check_examples(train_raw, "train")
    labels = [classify_data.label_text(ex, i, "train") for i, ex in enumerate(train_raw, 1)]
    names, ids = classify_data.classes(labels, hp.label_names, "train")
    held_out = False
    if spec.validation:
        valid_raw = read_examples(spec.validation, "validation")
        classify_data.check_examples(valid_raw, "validation")
        valid_ids = classify_data.label_ids([classify_data.label_text(ex, i, "validation") for i, ex in enumerate(valid_raw, 1)],
                                            names, "validation")
    else:
        keep, held = classify_data.stratified_hold_out(train_raw, labels, auto.holdout_for(len(train_raw), hp.validation_fraction), hp.seed)
        valid_raw, valid_ids = [train_raw[i] for i in held], [ids[i] for i in held]
        train_raw, ids = [train_raw[i] for i in keep], [ids[i] for i in keep]
        held_out = bool(held)
    check_class_weights(hp.class_weights, names)  # the names may be automatic: only now is the count known
    weights = hp.class_weights or classify_data.balanced_weights(ids, len(names))
    train = classify_data.tokenize(train_raw, ids, tokenizer, max_seq_len, "train")
    valid = classify_data.tokenize(valid_raw, valid_ids, tokenizer, max_seq_len, "validation") if valid_raw else classify_data.Labelled()
    absent = [names[c] for c in range(len(names)) if c not in set(ids)]
    warnings = train.warnings + valid.warnings + ([f"label(s) {', '.join(absent[:10])} have no training example"] if absent else [])
    return Data(names, list(weights), train.examples, valid.examples, held_out, warnings)


def run_classification(spec: TrainSpec, job: Job, store: JobStore, worker: str, registry: AdapterRegistry, model_cfg: ModelConfig,
                       max_lora_rank: int, job_dir: Path, stop: threading.Event | None) -> None:
    adapter = adapter_of(spec)
    quantization = "nf4" if adapter == "qlora" else "none"
    cfg = ModelConfig(source=model_cfg.source, quantization=quantization, double_quant=model_cfg.double_quant,
                      dtype=model_cfg.dtype, device=model_cfg.device, cache_dir=model_cfg.cache_dir)
    # The tokenizer first (the labels decide the head's size), then the base with that head.
    tok = AutoTokenizer.from_pretrained(resolve_checkpoint(cfg), trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # as the server's loader does
    data = prepare(spec, tok, spec.hyperparameters.max_seq_len)
    for w in data.warnings:
        store.add_event(job.id, "warning", {"message": w})
    set_seed(spec.hyperparameters.seed)  # the new head's initial weights too: the same job gives the same classifier
    k = len(data.names)
    loaded = load_base_model(cfg, AutoModelForSequenceClassification, num_labels=k, id2label=dict(enumerate(data.names)),
                             label2id={n: i for i, n in enumerate(data.names)}, pad_token_id=tok.pad_token_id)
    model, tok = loaded.model, loaded.tokenizer
    model.config.pad_token_id = tok.pad_token_id
    check_against_base(spec, linear_names(model), max_lora_rank, loaded.device.type == "cuda", base=model)
    shape = BaseShape.of(model)

    resolved = auto.resolve(spec.hyperparameters, "classification", len(data.train), model.config.hidden_size, bool(data.valid),
                            held_out_fraction=len(data.valid) / (len(data.train) + len(data.valid)) if data.held_out else 0.0,
                            cuda=loaded.device.type == "cuda")
    hp = dataclasses.replace(resolved.hp, label_names=data.names, class_weights=data.weights)
    automatic = set(resolved.automatic) | {n for n in ("label_names", "class_weights") if not getattr(spec.hyperparameters, n)}
    soft_text = adapter not in auto.LORA_METHODS and hp.virtual_tokens_init == "text"
    if soft_text and not hp.prompt_tuning_init_text:
        hp.prompt_tuning_init_text = init_text(data.names, tok, hp.num_virtual_tokens)  # the labels say what the task is about
        automatic.add("prompt_tuning_init_text")
    fit.stop_check(store, job, worker, stop)

    if quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = wrap(model, peft_config(adapter, hp, loaded, task="SEQ_CLS"))
    if soft_text and adapter == "prefix_tuning":
        init_prefix_from_text(model, tok, hp.prompt_tuning_init_text)
    elif soft_text and adapter == "p_tuning":
        init_prompt_encoder_from_text(model, tok, hp.prompt_tuning_init_text)

    evaluation = data.valid or data.train[:REPORT_ROWS]
    if not data.valid:
        store.add_event(job.id, "warning", {"message": "no validation set: the metrics of each epoch are measured on the training examples "
                                                       "and the last checkpoint is registered"})
    steps_per_epoch, total, every = fit.schedule(len(data.train), hp, evaluates=True)
    plan = {"hyperparameters": {k_: v for k_, v in dataclasses.asdict(hp).items() if auto.applies(k_, spec.method, adapter)},
            "automatic": sorted(automatic), "train_examples": len(data.train), "validation_examples": len(data.valid),
            "validation_held_out": data.held_out, "replay_examples": 0, "steps_per_epoch": steps_per_epoch}
    metric = "eval_loss" if hp.best_metric == "eval_loss" else f"eval_{hp.best_metric}"
    args = fit.training_arguments(hp, job_dir, loaded, total, every, evaluates=True, best_metric=metric if data.valid else None,
                                  greater_is_better=hp.best_metric != "eval_loss", label_names=["labels"])
    progress = Progress(store, job, worker, stop)
    callbacks = fit.callbacks_for(progress, hp, early_stopping=bool(data.valid))
    trainer = WeightedTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=evaluation, data_collator=Collator(tok.pad_token_id),
                              callbacks=callbacks, compute_metrics=compute_metrics(data.names), class_weights=hp.class_weights)
    fit.train(trainer, progress, callbacks, store, job, worker, total, plan, job_dir)

    # -- the registered checkpoint's numbers ---------------------------------------------
    train_loss = trainer.evaluate(eval_dataset=data.train[:REPORT_ROWS], metric_key_prefix="train")["train_loss"]
    out = trainer.predict(evaluation)
    s = scores(out.label_ids.reshape(-1).tolist(), out.predictions.argmax(-1).reshape(-1).tolist(), data.names)
    report = QualityReport(train_loss=train_loss, eval_loss=out.metrics["test_loss"] if data.valid else None, control_prompts=0,
                           classification={"split": "validation" if data.valid else "train", "label_names": data.names,
                                           **dataclasses.asdict(s)}).to_dict()

    final = job_dir / "adapter"
    model.save_pretrained(final)  # the best checkpoint (load_best_model_at_end), its score head in modules_to_save
    model.get_base_model().config.save_pretrained(final)  # config.json: id2label, the label names Classify returns
    compact = {**plan, "hyperparameters": {k_: v for k_, v in plan["hyperparameters"].items() if k_ not in ("label_names", "class_weights")}}
    record = fit.register(registry, store, job, worker, spec.adapter_name, final, validator(shape, max_lora_rank), loaded, quantization,
                          {**spec.labels, "method": spec.method, "task": "SEQ_CLS", "classifier_adapter": adapter, "num_labels": str(k)},
                          compact)
    store.add_event(job.id, "report", report)
    store.set_state(job.id, worker, "succeeded", adapter_id=record.id, trained_tokens=trainer.state.num_input_tokens_seen, quality=report)


def validator(shape: BaseShape, max_lora_rank: int):
    """The registry's check of a classifier: the server's own loader where it serves SEQ_CLS
    adapters (the Classify change); before that, the head checked here and the adapter under
    it loaded as the server loads any adapter of its type."""
    if "SEQ_CLS" in getattr(adapter_load, "TASKS", ()):
        return lambda p: adapter_load.load_adapter(p, p.name, shape, max_lora_rank)
    return lambda p: _load_without_head(p, shape, max_lora_rank)


def _load_without_head(path: Path, shape: BaseShape, max_lora_rank: int) -> Adapter:
    config, tensors = read_adapter_dir(path)
    head = {key: t for key, t in tensors.items() if any(f".{h}." in f".{key}" for h in HEAD) and "lora_" not in key}
    weight = next((t for key, t in head.items() if key.endswith("weight")), None)
    if weight is None or weight.dim() != 2 or weight.shape[1] != shape.hidden_size or not bool(torch.isfinite(weight).all()):
        raise AdapterIncompatible("a classifier must carry a finite score head [num_labels, hidden size]", field="modules_to_save")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CONFIG).write_text(json.dumps({**config, "task_type": "CAUSAL_LM", "modules_to_save": None}))
        save_file({key: t.contiguous() for key, t in tensors.items() if key not in head}, str(Path(tmp) / WEIGHTS))
        return adapter_load.load_adapter(Path(tmp), path.name, shape, max_lora_rank)
