"""A classifier's scores from its predictions: confusion matrix, accuracy, and per-label and
macro-averaged precision, recall and F1. Written out (about twenty lines) rather than taken
from sklearn or `evaluate`: neither is a dependency of the tuner, and these definitions are
sklearn's own (macro = the unweighted mean over labels; a label never predicted has
precision 0, one absent from the data recall 0 — sklearn's zero_division=0)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Scores:
    accuracy: float
    precision: float
    recall: float
    f1: float
    """Macro averages over every label (present in the data or not)."""
    per_label: list[dict]
    """{"label", "precision", "recall", "f1", "support"} in label order."""
    confusion: list[list[int]]
    """confusion[true][predicted]."""


def confusion(true: list[int], predicted: list[int], k: int) -> list[list[int]]:
    m = [[0] * k for _ in range(k)]
    for t, p in zip(true, predicted):
        m[t][p] += 1
    return m


def scores(true: list[int], predicted: list[int], names: list[str]) -> Scores:
    k = len(names)
    m = confusion(true, predicted, k)
    per = []
    for c in range(k):
        tp = m[c][c]
        predicted_c = sum(m[r][c] for r in range(k))
        actual_c = sum(m[c])
        p = tp / predicted_c if predicted_c else 0.0
        r = tp / actual_c if actual_c else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per.append({"label": names[c], "precision": p, "recall": r, "f1": f, "support": actual_c})
    mean = lambda key: sum(x[key] for x in per) / k if k else 0.0  # noqa: E731
    accuracy = sum(m[c][c] for c in range(k)) / len(true) if true else 0.0
    return Scores(accuracy, mean("precision"), mean("recall"), mean("f1"), per, m)


def compute_metrics(names: list[str]):
    """transformers' compute_metrics hook: EvalPrediction (logits [N, k], label ids [N]) → the
    eval event's numbers (the Trainer prefixes them with "eval_")."""
    def compute(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        s = scores(pred.label_ids.reshape(-1).tolist(), logits.argmax(-1).reshape(-1).tolist(), names)
        return {"accuracy": s.accuracy, "precision": s.precision, "recall": s.recall, "f1": s.f1}

    return compute
