"""The served decision rule for a face of unknown origin, fitted on the combined validation.

The network's flipped log-probabilities get per-class offsets chosen to maximise the mean of
the two validation macro-F1s (identity val over 8 classes, FER-2013 PublicTest over 7),
served at the share of them (none, half or all) that cross-validation within validation
supports, then one temperature fitted by likelihood on both validation sets (each counting
the same), so the probabilities the service reports are calibrated without moving any
decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from training.evaluate import macro_f1, tune_class_bias


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


@dataclass(frozen=True)
class DecisionRule:
    bias: np.ndarray          # added to the log-probabilities
    temperature: float = 1.0  # divides them afterwards

    def predict(self, log_probs: np.ndarray) -> np.ndarray:
        return (log_probs + self.bias).argmax(1)

    def probabilities(self, log_probs: np.ndarray) -> np.ndarray:
        return np.exp(log_softmax((log_probs + self.bias) / self.temperature))

    def to_dict(self) -> dict:
        return {"class_offsets": [float(b) for b in self.bias],
                "temperature": float(self.temperature)}

    @classmethod
    def from_dict(cls, values: dict) -> DecisionRule:
        return cls(np.asarray(values["class_offsets"], dtype=np.float64),
                   float(values.get("temperature", 1.0)))


@dataclass
class JointValidation:
    """Validation log-probabilities of several sets, with what scores each."""

    names: list[str]
    log_probs: list[np.ndarray]
    labels: list[np.ndarray]
    classes: list[tuple[int, ...]]
    groups: list[np.ndarray]  # who may not be split apart when validation is halved

    @classmethod
    def of(cls, sets, scores: dict[str, np.ndarray], ws=None) -> JointValidation:
        groups = []
        for s in sets:
            if ws is not None and s.name == "identity":
                groups.append(ws.subsets("identity")["val"].identities)
            else:
                groups.append(np.arange(len(s.labels)))
        return cls([s.name for s in sets], [scores[s.name] for s in sets],
                   [s.labels for s in sets], [s.classes for s in sets], groups)

    def subset(self, masks: list[np.ndarray]) -> JointValidation:
        def pick(arrays):
            return [a[m] for a, m in zip(arrays, masks, strict=True)]

        return JointValidation(self.names, pick(self.log_probs), pick(self.labels),
                               self.classes, pick(self.groups))

    def scores(self, bias: np.ndarray) -> dict[str, float]:
        return {name: macro_f1(y, (x + bias).argmax(1), c) for name, x, y, c in
                zip(self.names, self.log_probs, self.labels, self.classes, strict=True)}

    def criterion(self, bias: np.ndarray) -> float:
        """What chooses: the mean of the sets' macro-F1s."""
        return float(np.mean(list(self.scores(bias).values())))


def fit_offsets(val: JointValidation) -> np.ndarray:
    stacked = np.concatenate(val.log_probs)
    bounds = np.cumsum([0] + [len(x) for x in val.log_probs])

    def score(predicted: np.ndarray) -> float:
        return float(np.mean([macro_f1(y, predicted[a:b], c) for y, c, a, b in
                              zip(val.labels, val.classes, bounds[:-1], bounds[1:], strict=True)]))

    return tune_class_bias(stacked, None, score=score)


def fit_temperature(val: JointValidation, bias: np.ndarray) -> float:
    def nll(log_t: float) -> float:
        t = np.exp(log_t)
        losses = [-log_softmax((x + bias) / t)[np.arange(len(y)), y].mean()
                  for x, y in zip(val.log_probs, val.labels, strict=True)]
        return float(np.mean(losses))

    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


# How much of the fitted offsets the served rule keeps: 0 serves none, 1 all of them.
SHRINKS = (0.0, 0.5, 1.0)


def served_offsets(val: JointValidation, shrink: float = 1.0) -> np.ndarray:
    """``shrink`` times the offsets fitted on ``val``; none fitted at all when it is 0."""
    if not shrink:
        return np.zeros(val.log_probs[0].shape[1])
    return shrink * fit_offsets(val)


def fit_decision_rule(val: JointValidation, shrink: float = 1.0) -> DecisionRule:
    bias = served_offsets(val, shrink)
    return DecisionRule(bias, fit_temperature(val, bias))


def choose_shrink(val: JointValidation, shrinks=SHRINKS) -> tuple[float, dict]:
    """The share of the offsets to serve, by the cross-validated criterion: offsets fitted on
    a few FEAR or CONTEMPT faces can score well where they were fitted and badly elsewhere.
    Ties go to the smaller share. Returns it and each share's cross-validated figures."""
    results = {str(k): cross_validated_criterion(val, shrink=k) for k in shrinks}
    best = max(shrinks, key=lambda k: (round(results[str(k)]["criterion"], 6), -k))
    return best, results


def cross_validated_criterion(val: JointValidation, halvings: int = 3, seed: int = 0,
                              shrink: float = 1.0) -> dict:
    """The criterion with offsets fitted on one half of validation and scored on the other
    (halves by group, both ways, ``halvings`` times): what a lever acting on calibration is
    judged by, since offsets fitted and scored on the same images flatter it. ``shrink``
    scales the fitted offsets (0: none, the raw criterion on each half)."""
    rng = np.random.default_rng(seed)
    per_set: dict[str, list[float]] = {name: [] for name in val.names}
    for _ in range(halvings):
        masks = []
        for groups in val.groups:
            unique = np.unique(groups)
            first = set(rng.permutation(unique)[: len(unique) // 2].tolist())
            masks.append(np.array([g in first for g in groups]))
        for half in (0, 1):
            fit_on = val.subset([m if half == 0 else ~m for m in masks])
            score_on = val.subset([~m if half == 0 else m for m in masks])
            for name, value in score_on.scores(served_offsets(fit_on, shrink)).items():
                per_set[name].append(value)
    means = {name: float(np.mean(v)) for name, v in per_set.items()}
    return {"criterion": float(np.mean(list(means.values()))), **means}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15
                               ) -> tuple[float, list[dict]]:
    """ECE of the top probability over equal-width bins, and the reliability diagram's bins."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    table, ece = [], 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            gap = abs(correct[inside].mean() - confidence[inside].mean())
            ece += inside.mean() * gap
            table.append({"low": float(low), "high": float(high), "n": int(inside.sum()),
                          "accuracy": float(correct[inside].mean()),
                          "confidence": float(confidence[inside].mean())})
    return float(ece), table
