"""Loading the shipped models: verified by SHA-256 before a single byte is deserialised."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from service.classes import CLASS_NAMES, NUM_CLASSES
from service.manifest import (
    FileTooLargeError,
    Manifest,
    ModelEntry,
    read_regular_file,
    sha256_bytes,
)
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
        self._check_contract()

    def _check_contract(self) -> None:
        """The file's own declared tensors and metadata are the contract: a batch fixed at
        1 loaded ready, then answered every request of two images with a 500 (a review)."""
        tensors = {t.name: t for t in (*self.session.get_inputs(), *self.session.get_outputs())}
        for name, dims in zip((self.input_name, self.output_name), CONTRACT_SHAPES["onnx"],
                              strict=True):
            tensor = tensors.get(name)
            if tensor is None:
                raise ValueError(f"the file has no tensor named {name!r} (it has "
                                 f"{sorted(tensors)})")
            if (tensor.type != "tensor(float)" or tensor.shape[1:] != dims
                    or isinstance(tensor.shape[0], int)):
                raise ValueError(f"{name} is {tensor.type} {tensor.shape}, the contract is "
                                 f"tensor(float) {with_batch(dims)}")
        meta = self.session.get_modelmeta().custom_metadata_map
        for key, expected in (("classes", ",".join(CLASS_NAMES)),
                              ("preprocessing_version", PREPROCESSING_VERSION)):
            if key in meta and meta[key] != expected:
                raise ValueError(f"its metadata gives {key} {meta[key]!r}, the service "
                                 f"{expected!r}")

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(images[:, None, :, :], dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0]


class SklearnClassifier:
    def __init__(self, data: bytes, threads: int = 0):
        """``threads``: the worker's share of the CPUs, as the ONNX model's (0: all of them).
        scikit-learn's neighbour search runs on OpenMP, which took every CPU in each worker:
        two workers on two cores then waited on each other (benchmarks/RESULTS.md)."""
        import joblib
        from threadpoolctl import ThreadpoolController

        self.pipeline = joblib.load(io.BytesIO(data))
        # the libraries loaded now, scikit-learn's OpenMP among them, found once (a call then
        # costs about 20 us)
        self.thread_pools = ThreadpoolController()
        # a limit sets the count: an OMP_NUM_THREADS below the share must not be raised
        openmp = [pool["num_threads"] for pool in self.thread_pools.info()
                  if pool["user_api"] == "openmp"]
        self.threads = min([threads, *openmp]) if threads else 0
        classes = np.asarray(getattr(self.pipeline, "classes_", [])).tolist()  # not np.int64(1)
        if classes != list(range(NUM_CLASSES)):
            raise ValueError(f"the pipeline's classes are {classes}, expected 0..7")

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), -1)
        if not self.threads:
            return self.pipeline.predict_proba(flat).astype(np.float32)
        # OpenMP's thread count is the calling thread's own: concurrent calls keep theirs
        with self.thread_pools.limit(limits=self.threads, user_api="openmp"):
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


# Per kind, the shapes past the batch (a name, as N: any size) of the input and the output,
# both float32: the ONNX file takes images, the scikit-learn pipeline their pixels in a row.
CONTRACT_SHAPES = {"onnx": [[1, INPUT_SIZE, INPUT_SIZE], [NUM_CLASSES]],
                   "sklearn": [[INPUT_SIZE * INPUT_SIZE], [NUM_CLASSES]]}


def with_batch(dims: list[int]) -> str:
    """A contract shape as the manifest writes it, its batch named N."""
    return str(["N", *dims])


def check_probabilities(classifier: Classifier) -> None:
    """A batch of two, answered with probabilities: a network without its softmax answered
    logits as "probabilities", and one of fixed batch 1 loaded ready (a review)."""
    warm = classifier.predict_proba(np.stack([np.zeros((INPUT_SIZE, INPUT_SIZE), np.float32),
                                              np.full((INPUT_SIZE, INPUT_SIZE), 0.5,
                                                      np.float32)]))
    if warm.shape != (2, NUM_CLASSES):
        raise ValueError(f"a batch of 2 gave the shape {warm.shape}, expected "
                         f"(2, {NUM_CLASSES})")
    sums = warm.sum(axis=1)
    if not (np.isfinite(warm).all() and warm.min() >= 0 and warm.max() <= 1
            and np.allclose(sums, 1, atol=1e-3)):
        raise ValueError(f"its outputs are not probabilities: from {warm.min():.3g} to "
                         f"{warm.max():.3g}, rows summing to "
                         f"{', '.join(f'{total:.4f}' for total in sums)}")


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
            data = read_regular_file(path, max(entry.bytes, 0))
            size = len(data)
        except OSError as exc:
            registry.failures[name] = f"cannot read {entry.file}: {exc.strerror}"
            continue
        except FileTooLargeError as exc:
            data, size = b"", exc.size
        except ValueError as exc:  # a FIFO or a device under the model's name
            registry.failures[name] = f"{exc}; refused without loading"
            continue
        if size != entry.bytes:  # /models publishes the manifest's figure
            registry.failures[name] = (f"{entry.file} has {size} bytes, the manifest says "
                                       f"{entry.bytes}; refused without loading")
            continue
        actual = sha256_bytes(data)
        if actual != entry.sha256:
            # Never deserialise bytes that differ from what was shipped: joblib is pickle.
            registry.failures[name] = (f"{entry.file} has sha256 {actual}, the manifest says "
                                       f"{entry.sha256}; refused without loading")
            continue
        contract = CONTRACT_SHAPES[entry.kind]
        tensors = (entry.input, entry.output)
        if any(t.dtype != "float32" or len(t.shape) != len(dims) + 1
               or not isinstance(t.shape[0], str) or t.shape[1:] != dims
               for t, dims in zip(tensors, contract, strict=True)):
            # /models publishes these: a manifest edited to another shape stayed ready
            registry.failures[name] = (
                f"the manifest gives {entry.file} "
                + " -> ".join(f"{t.dtype} {t.shape}" for t in tensors) + ", the contract is "
                + " -> ".join(f"float32 {with_batch(dims)}" for dims in contract) + "; refused")
            continue
        try:
            classifier = (OnnxClassifier(data, entry, threads) if entry.kind == "onnx"
                          else SklearnClassifier(data, threads))
            check_probabilities(classifier)
        except Exception as exc:  # a broken artifact must not take the other model down
            registry.failures[name] = (f"{entry.file} failed to load as {entry.kind}: "
                                       f"{type(exc).__name__}: {exc}")
            continue
        registry.models[name] = LoadedModel(name, entry, classifier)
    for name, reason in registry.failures.items():
        logger.error("model %s refused: %s", name, reason)
    for name, model in registry.models.items():
        logger.info("model %s loaded (sha256 %s)", name, model.sha256[:12])
    return registry
