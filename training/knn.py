"""k-nearest neighbours on the shared preprocessing, as a self-contained scikit-learn Pipeline."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

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


def sweep_k(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
            ks: tuple[int, ...], weightings: tuple[str, ...] = ("uniform", "distance"),
            seed: int = 0) -> tuple[Pipeline, dict, list[dict]]:
    """Fit once per (k, weighting) and score on validation.

    Returns the fitted pipeline with the best validation macro-F1 (the smaller k on a tie),
    its scores, and the whole sweep.
    """
    scores, best, best_pipeline = [], None, None
    for weights in weightings:
        for k in ks:
            k_eff = min(k, len(train_y))
            pipeline = fit_pipeline(build_pipeline(k_eff, weights, seed), train_x, train_y)
            predicted = pipeline[1:].predict(val_x)
            score = {"k": k_eff, "weights": weights, "val_macro_f1": macro_f1(val_y, predicted)}
            scores.append(score)
            if best is None or (score["val_macro_f1"], -score["k"]) > (
                    best["val_macro_f1"], -best["k"]):
                best, best_pipeline = score, pipeline
    return best_pipeline, best, scores
