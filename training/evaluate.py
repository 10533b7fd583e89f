"""Metrics that mean something under extreme imbalance: per class, macro, and confusion."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from service.classes import CLASS_NAMES, NUM_CLASSES

LABELS = list(range(NUM_CLASSES))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, macro and weighted P/R/F1, per-class P/R/F1/support, confusion matrix.

    Macro averages run over all eight classes, including a class absent from the subset
    (its F1 counts as 0), so a model that never predicts CONTEMPT cannot hide it.
    """
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=LABELS, zero_division=0)
    averaged = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=LABELS, average=average, zero_division=0)
        averaged[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    large = [i for i, n in enumerate(CLASS_NAMES) if n not in ("FEAR", "CONTEMPT")]
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": averaged["macro"]["f1"],
        "macro_f1_six_large_classes": float(np.mean(f1[large])),
        "macro": averaged["macro"],
        "weighted": averaged["weighted"],
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(CLASS_NAMES)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=LABELS).tolist(),
    }


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(precision_recall_fscore_support(
        y_true, y_pred, labels=LABELS, average="macro", zero_division=0)[2])


def bootstrap_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray,
                       rounds: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of macro-F1, resampling whole identities (a person's images move together)."""
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    scores = []
    for _ in range(rounds):
        chosen = rng.integers(0, len(unique), len(unique))
        idx = np.concatenate([members[g] for g in chosen])
        scores.append(macro_f1(y_true[idx], y_pred[idx]))
    low, high = np.percentile(scores, [2.5, 97.5])
    return float(low), float(high)


def tune_class_bias(log_probs: np.ndarray, y_true: np.ndarray, rounds: int = 3,
                    grid: np.ndarray | None = None) -> np.ndarray:
    """Per-class additive log-probability offsets that maximise macro-F1 (coordinate ascent).

    Fitted on validation only; the test set never chooses anything.
    """
    grid = np.linspace(-3, 3, 25) if grid is None else grid
    bias = np.zeros(log_probs.shape[1])
    best = macro_f1(y_true, (log_probs + bias).argmax(1))
    for _ in range(rounds):
        for c in range(log_probs.shape[1]):
            for value in grid:
                trial = bias.copy()
                trial[c] = value
                score = macro_f1(y_true, (log_probs + trial).argmax(1))
                if score > best + 1e-9:
                    best, bias = score, trial
    return bias
