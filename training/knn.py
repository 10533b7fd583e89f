"""k-nearest neighbours on the shared preprocessing, as a self-contained scikit-learn Pipeline."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from service.classes import NUM_CLASSES
from service.features import BlockMeanDownsample
from training.cache import DecodedImages
from training.evaluate import macro_f1

# Pixels say more when every position is put on one scale (faces are aligned, so a pixel's
# brightness relative to its own mean carries the expression) and PCA drops the noise
# dimensions that would dominate a Euclidean distance over 1,225 raw pixels.
DOWNSAMPLE = 10
PCA_COMPONENTS = 64


def build_pipeline(k: int, weights: str = "distance", seed: int = 0) -> Pipeline:
    return Pipeline([
        ("downsample", BlockMeanDownsample(DOWNSAMPLE)),
        ("scale", StandardScaler()),
        ("pca", PCA(n_components=PCA_COMPONENTS, whiten=True, random_state=seed)),
        ("knn", KNeighborsClassifier(n_neighbors=k, weights=weights)),
    ])


def downsampled(decoded: DecodedImages, names: list[str], chunk: int = 512) -> np.ndarray:
    """The pipeline's stateless first step, applied in chunks (the full inputs take 5 GB)."""
    step = BlockMeanDownsample(DOWNSAMPLE)
    rows = decoded.rows_of(names)
    parts = []
    for start in range(0, len(rows), chunk):
        batch = decoded.inputs(rows[start:start + chunk])
        parts.append(step.transform(batch.reshape(len(batch), -1)))
    return np.concatenate(parts)


def fit_pipeline(pipeline: Pipeline, features: np.ndarray, labels: np.ndarray) -> Pipeline:
    pipeline[1:].fit(features, labels)  # the downsample step is stateless
    return pipeline


def sweep_k(train_x: np.ndarray, train_y: np.ndarray, vals, ks: tuple[int, ...],
            weightings: tuple[str, ...] = ("uniform", "distance"),
            seed: int = 0, val_y: np.ndarray | None = None) -> tuple[Pipeline, dict, list[dict]]:
    """Fit once per (k, weighting) and score on validation.

    ``vals`` is one validation feature matrix (with ``val_y``), or a list of ``(features,
    labels, classes)`` sets judged by the mean of their macro-F1s. Returns the fitted pipeline
    with the best validation score (the smaller k on a tie), its scores, and the whole sweep.
    """
    if val_y is not None:
        vals = [(vals, val_y, tuple(range(NUM_CLASSES)))]
    scores, best, best_pipeline = [], None, None
    for weights in weightings:
        for k in ks:
            k_eff = min(k, len(train_y))
            pipeline = fit_pipeline(build_pipeline(k_eff, weights, seed), train_x, train_y)
            per_set = [macro_f1(y, pipeline[1:].predict(x), classes) for x, y, classes in vals]
            score = {"k": k_eff, "weights": weights, "val_macro_f1": float(np.mean(per_set))}
            if len(per_set) > 1:
                score["val_macro_f1_per_set"] = per_set
            scores.append(score)
            if best is None or (score["val_macro_f1"], -score["k"]) > (
                    best["val_macro_f1"], -best["k"]):
                best, best_pipeline = score, pipeline
    return best_pipeline, best, scores
