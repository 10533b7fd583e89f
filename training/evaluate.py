"""Metrics that mean something under extreme imbalance: per class, macro, and confusion."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from service.classes import CLASS_NAMES, NUM_CLASSES

LABELS = list(range(NUM_CLASSES))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           classes: tuple[int, ...] | list[int] = tuple(LABELS)) -> dict:
    """Accuracy, macro and weighted P/R/F1, per-class P/R/F1/support, confusion matrix.

    Macro averages run over ``classes``: by default all eight, including a class absent from
    the subset (its F1 counts as 0), so a model that never predicts CONTEMPT cannot hide it.
    A dataset without a class (FER-2013 has no CONTEMPT) is scored over the classes it has;
    predicting the missing class is still an error, and the confusion matrix keeps all eight.
    """
    classes = list(classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    averaged = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, average=average, zero_division=0)
        averaged[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    large = [k for k, i in enumerate(classes) if CLASS_NAMES[i] not in ("FEAR", "CONTEMPT")]
    metrics = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": averaged["macro"]["f1"],
        "macro": averaged["macro"],
        "weighted": averaged["weighted"],
        "per_class": {
            CLASS_NAMES[c]: {"precision": float(precision[k]), "recall": float(recall[k]),
                             "f1": float(f1[k]), "support": int(support[k])}
            for k, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=LABELS).tolist(),
    }
    if len(classes) == NUM_CLASSES:  # this dataset's headline without its two tiny classes
        metrics["macro_f1_six_large_classes"] = float(np.mean(f1[large]))
    return metrics


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray,
             classes: tuple[int, ...] | list[int] = tuple(LABELS)) -> float:
    """scikit-learn's macro-F1 over ``classes`` (zero_division=0), from one bincount: the
    offset search calls it thousands of times, where scikit-learn's checks dominate."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    matrix = np.bincount(y_true * NUM_CLASSES + y_pred, minlength=NUM_CLASSES ** 2).reshape(
        NUM_CLASSES, NUM_CLASSES)
    classes = list(classes)
    tp = np.diag(matrix)[classes].astype(float)
    predicted, actual = matrix.sum(0)[classes], matrix.sum(1)[classes]
    denominator = predicted + actual
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1.mean())


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


def tune_class_bias(log_probs: np.ndarray, y_true: np.ndarray | None, rounds: int = 3,
                    grid: np.ndarray | None = None, score=None) -> np.ndarray:
    """Per-class additive log-probability offsets that maximise macro-F1 (coordinate ascent),
    or ``score(predicted classes)`` where given (several validation sets at once).

    Fitted on validation only; the test set never chooses anything.
    """
    grid = np.linspace(-3, 3, 25) if grid is None else grid
    if score is None:
        def score(predicted: np.ndarray) -> float:
            return macro_f1(y_true, predicted)
    bias = np.zeros(log_probs.shape[1])
    best = score((log_probs + bias).argmax(1))
    for _ in range(rounds):
        for c in range(log_probs.shape[1]):
            for value in grid:
                trial = bias.copy()
                trial[c] = value
                result = score((log_probs + trial).argmax(1))
                if result > best + 1e-9:
                    best, bias = result, trial
    return bias
