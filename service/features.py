"""Feature steps that live inside shipped scikit-learn pipelines.

They are here, not in ``training``, because unpickling a pipeline imports its classes and
the service must never import training code.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from service.preprocessing import INPUT_SIZE


class BlockMeanDownsample(TransformerMixin, BaseEstimator):
    """Flattened 350x350 model inputs -> flattened (350/factor)^2 block means."""

    def __init__(self, factor: int = 10):
        self.factor = factor

    def fit(self, X, y=None):
        return self

    def transform(self, X) -> np.ndarray:
        if INPUT_SIZE % self.factor:
            raise ValueError(f"factor {self.factor} does not divide {INPUT_SIZE}")
        X = np.asarray(X, dtype=np.float32)
        side = INPUT_SIZE // self.factor
        blocks = X.reshape(len(X), side, self.factor, side, self.factor)
        return blocks.mean(axis=(2, 4)).reshape(len(X), side * side)

    def __sklearn_is_fitted__(self) -> bool:
        return True  # stateless
