"""What a job minimises: the ordinary next-token loss on the labelled tokens, plus, on
replay rows that carry the base's top-k (replay.py), kl_weight × KL(base ‖ adapter) of
the next-token distributions at the positions that predict the base's answer. The
base's side was computed once, before training, so a KL step costs what a replay step
costs: no second model, no extra forward pass."""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import Trainer


class Collator:
    """Pads a batch: input ids with the pad id, labels with -100; when rows carry the base's
    top-k, `kl_ids` / `kl_logp` [B, T, k] hold them at the positions that predict the
    answer (position t predicts token t + 1) and `kl_mask` [B, T] marks those positions."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        n = max(len(x["input_ids"]) for x in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, x in enumerate(batch):
            k = len(x["input_ids"])
            ids[i, :k] = torch.tensor(x["input_ids"])
            labels[i, :k] = torch.tensor(x["labels"])
            mask[i, :k] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        with_kl = [x for x in batch if "kl_ids" in x]
        if with_kl:
            top_k = len(with_kl[0]["kl_ids"][0])
            kl_ids = torch.zeros((len(batch), n, top_k), dtype=torch.long)
            kl_logp = torch.zeros((len(batch), n, top_k), dtype=torch.float32)
            kl_mask = torch.zeros((len(batch), n), dtype=torch.bool)
            for i, x in enumerate(batch):
                if "kl_ids" in x:
                    s, m = x["kl_start"], len(x["kl_ids"])
                    kl_ids[i, s:s + m] = torch.tensor(x["kl_ids"])
                    kl_logp[i, s:s + m] = torch.tensor(x["kl_logp"])
                    kl_mask[i, s:s + m] = True
            out |= {"kl_ids": kl_ids, "kl_logp": kl_logp, "kl_mask": kl_mask}
        return out


class PreservingTrainer(Trainer):
    """Trainer with the tuner's loss: cross-entropy on the labelled tokens plus the KL-to-base
    term where rows carry the base's top-k. Logits are computed only at the positions that
    take a loss (transformers' `logits_to_keep` mask): the vocabulary projection and its
    softmax are a fifth of a small model's training FLOPs, and most positions of a chat
    example (system prompt, question) take none."""

    def __init__(self, *args, kl_weight: float = 0.0, virtual_tokens: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kl_weight = kl_weight
        self.virtual_tokens = virtual_tokens
        """Prompt tuning / P-tuning put this many positions before the input's."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kl = {k: inputs.pop(k) for k in ("kl_ids", "kl_logp", "kl_mask") if k in inputs}
        if not self.keeps_logits and not (kl and self.kl_weight):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        labels = inputs.pop("labels")
        B, T = labels.shape
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]: the token each position predicts
        with_kl = bool(kl) and self.kl_weight > 0
        need = targets.ne(-100) | (kl["kl_mask"] if with_kl else False)  # [B, T] positions that take a loss
        if self.keeps_logits:
            keep = F.pad(need, (self.virtual_tokens, 0), value=False)  # [B, virtual + T]
            outputs = model(**inputs, logits_to_keep=keep)
            logits = outputs.logits  # [N, V], N = need.sum()
        else:
            outputs = model(**inputs)
            logits = outputs.logits[:, -T:][need]  # [N, V]
        ce = F.cross_entropy(logits.float(), targets[need], ignore_index=-100, reduction="sum")
        divergence = logits.new_zeros((), dtype=torch.float32)
        if with_kl:
            at = kl["kl_mask"][need]  # [N] positions with the base's top-k
            q = F.log_softmax(logits[at].float(), dim=-1).gather(-1, kl["kl_ids"][need][at])  # [M, k] the adapter's log-probs
            p = kl["kl_logp"][need][at]  # [M, k] the base's
            divergence = (p.exp() * (p - q)).sum(-1).mean()  # forward KL over the base's top-k, mean per position
        # Scale as the Trainer's own path does, so training_step treats both alike: with
        # num_items_in_batch the loss is already normalised over the accumulated batch.
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            n = num_items_in_batch.clamp(min=1) if torch.is_tensor(num_items_in_batch) else max(num_items_in_batch, 1)
            ce, divergence = ce / n, divergence / getattr(self, "current_gradient_accumulation_steps", 1)
        else:
            ce = ce / targets.ne(-100).sum().clamp(min=1)
        loss = ce + self.kl_weight * divergence
        return (loss, outputs) if return_outputs else loss
