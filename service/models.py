"""Loading the shipped models: verified by SHA-256 before a single byte is deserialised."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from service.classes import NUM_CLASSES
from service.manifest import Manifest, ModelEntry, sha256_bytes
from service.onnx_runtime import onnx_session
from service.preprocessing import INPUT_SIZE, PREPROCESSING_VERSION

logger = logging.getLogger("service.models")


class Classifier(Protocol):
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """float32 ``[N, 350, 350]`` in [0, 1] -> probabilities ``[N, 8]``."""


class OnnxClassifier:
    def __init__(self, data: bytes, entry: ModelEntry, threads: int):
        self.session = onnx_session(data, threads)
        self.input_name = entry.input.name
        self.output_name = entry.output.name

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(images[:, None, :, :], dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0]


class SklearnClassifier:
    def __init__(self, data: bytes):
        import joblib

        self.pipeline = joblib.load(io.BytesIO(data))
        classes = list(getattr(self.pipeline, "classes_", []))
        if classes != list(range(NUM_CLASSES)):
            raise ValueError(f"the pipeline's classes are {classes}, expected 0..7")

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1)
        return self.pipeline.predict_proba(flat).astype(np.float32)


@dataclass
class LoadedModel:
    name: str
    entry: ModelEntry
    classifier: Classifier

    @property
    def sha256(self) -> str:
        return self.entry.sha256


@dataclass
class ModelRegistry:
    """What the lifespan loaded: the models that passed verification, and why others did not."""

    manifest: Manifest
    models: dict[str, LoadedModel] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return bool(self.models) and not self.failures


def load_models(manifest: Manifest, models_dir: Path, threads: int) -> ModelRegistry:
    registry = ModelRegistry(manifest)
    for name, entry in manifest.models.items():
        if entry.preprocessing_version != PREPROCESSING_VERSION:
            # fed another preprocessing's inputs it would answer, wrongly, without an error
            registry.failures[name] = (f"{entry.file} was built for preprocessing version "
                                       f"{entry.preprocessing_version}, this service runs "
                                       f"{PREPROCESSING_VERSION}; refused")
            continue
        path = models_dir / entry.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            registry.failures[name] = f"cannot read {entry.file}: {exc.strerror}"
            continue
        actual = sha256_bytes(data)
        if len(data) != entry.bytes:  # /models publishes the manifest's figure
            registry.failures[name] = (f"{entry.file} has {len(data)} bytes, the manifest says "
                                       f"{entry.bytes}; refused without loading")
            continue
        if actual != entry.sha256:
            # Never deserialise bytes that differ from what was shipped: joblib is pickle.
            registry.failures[name] = (f"{entry.file} has sha256 {actual}, the manifest says "
                                       f"{entry.sha256}; refused without loading")
            continue
        try:
            classifier = (OnnxClassifier(data, entry, threads) if entry.kind == "onnx"
                          else SklearnClassifier(data))
            warm = classifier.predict_proba(np.zeros((1, INPUT_SIZE, INPUT_SIZE), np.float32))
            if warm.shape != (1, NUM_CLASSES):
                raise ValueError(f"output shape {warm.shape}, expected (1, {NUM_CLASSES})")
        except Exception as exc:  # a broken artifact must not take the other model down
            registry.failures[name] = f"{entry.file} failed to load: {exc}"
            continue
        registry.models[name] = LoadedModel(name, entry, classifier)
    for name, reason in registry.failures.items():
        logger.error("model %s refused: %s", name, reason)
    for name, model in registry.models.items():
        logger.info("model %s loaded (sha256 %s)", name, model.sha256[:12])
    return registry
