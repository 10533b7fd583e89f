"""The model work, with no protocol in it: images in, labels, probabilities and face boxes out.

:class:`Predictor` owns what a worker loaded (the verified models, the face cropper) and the
limits, and reports what it does through :class:`PredictionHooks` (the service's metrics; a
command-line run passes none). ``/predict``, the Open Inference Protocol and the command line
are thin layers that turn their own requests into :class:`ImageInput` and the results back
into their own answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from PIL import Image

from service.classes import CLASS_NAMES
from service.faces import Box, FaceCropper, load_verified_face_crop
from service.manifest import FileEntry, load_manifest
from service.models import LoadedModel, ModelRegistry, load_models
from service.preprocessing import (
    INPUT_SIZE,
    DecodedImage,
    ImageLimits,
    PreprocessingError,
    decode_grayscale,
    pixels_to_input,
    resize_to_input,
    shown,
)

FacesMode = Literal["auto", "all", "none"]
FACES_MODES: tuple[FacesMode, ...] = ("auto", "all", "none")


@dataclass(frozen=True)
class ImageInput:
    """One encoded image, named as its sender named it (never used as a path)."""

    name: str | None
    data: bytes | None = None
    error: PreprocessingError | None = None  # refused while it was being read


@dataclass(frozen=True)
class FacePrediction:
    """One classified face, or the whole image when ``face`` is None."""

    label_id: int
    probabilities: np.ndarray  # float32 [8], class-list order
    face: Box | None = None    # in the upload's own (upright) pixels

    @property
    def label(self) -> str:
        return CLASS_NAMES[self.label_id]


@dataclass(frozen=True)
class ImagePrediction:
    """What one image gave: its faces' predictions, or why it was not classified."""

    name: str | None
    predictions: tuple[FacePrediction, ...] = ()
    error: PreprocessingError | None = None
    faces_found: int | None = None  # by the detector, before the limit; None: not searched


@dataclass(frozen=True)
class ModelInputs:
    """The uint8 350x350 inputs one image gives, each with its face box, and how many faces
    were found in it (None: ``faces=none``, no search)."""

    crops: list[tuple[np.ndarray, Box | None]]
    faces_found: int | None = None


class PredictorError(Exception):
    """A request the predictor cannot serve; ``code`` is stable, the message is for people."""

    code = "predictor_error"


class UnknownModelError(PredictorError):
    code = "unknown_model"


class ModelUnavailableError(PredictorError):
    code = "model_unavailable"


class FacesUnavailableError(PredictorError):
    code = "faces_unavailable"


class PredictionHooks(Protocol):
    """What the predictor reports as it works (the service counts it in Prometheus)."""

    def on_rejected(self, code: str) -> None: ...

    def on_faces(self, cropped: int) -> None: ...  # not faces_found: after the limit

    def on_inference(self, model: str, seconds: float) -> None: ...

    def on_prediction(self, model: str, label: str, probability: float) -> None: ...


class NoHooks:
    def on_rejected(self, code: str) -> None:
        pass

    def on_faces(self, cropped: int) -> None:
        pass

    def on_inference(self, model: str, seconds: float) -> None:
        pass

    def on_prediction(self, model: str, label: str, probability: float) -> None:
        pass


def load_face_cropper(models_dir: Path, entry: FileEntry | None
                      ) -> tuple[FaceCropper | None, str | None]:
    """The detector and crop geometry that ``entry`` (the manifest's) pins, or None and why:
    faces=none still serves without."""
    try:
        cropper = FaceCropper(load_verified_face_crop(models_dir, entry), models_dir)
        cropper.faces(Image.new("L", (INPUT_SIZE, INPUT_SIZE)))  # warm up
    except Exception as exc:  # a missing or broken file must not stop the models serving
        # /readyz shows it to any client: a file's name, not the server's path to it
        said = (f"cannot read {Path(exc.filename).name}: {exc.strerror}"
                if isinstance(exc, OSError) and exc.filename else f"{type(exc).__name__}: {exc}")
        reason = f"face detection refused: {said}"
        logging.getLogger("service").error("%s (in %s)", reason, models_dir)
        return None, reason
    return cropper, None


@dataclass
class Predictor:
    registry: ModelRegistry
    limits: ImageLimits = field(default_factory=ImageLimits)
    cropper: FaceCropper | None = None
    cropper_error: str | None = "no face detector loaded"
    max_faces: int = 16
    hooks: PredictionHooks = field(default_factory=NoHooks)

    @classmethod
    def load(cls, models_dir: Path, threads: int, limits: ImageLimits | None = None,
             max_faces: int = 16, hooks: PredictionHooks | None = None) -> Predictor:
        """Everything from ``models_dir``, each file verified against the manifest first.
        A missing or malformed manifest raises :class:`service.manifest.ManifestError`."""
        manifest = load_manifest(models_dir)
        registry = load_models(manifest, models_dir, threads)
        cropper, error = load_face_cropper(models_dir, manifest.face_detector)
        return cls(registry, limits or ImageLimits(), cropper, error, max_faces,
                   hooks or NoHooks())

    @property
    def model_names(self) -> list[str]:
        return sorted(self.registry.manifest.models)

    def model(self, name: str) -> LoadedModel:
        if name not in self.registry.manifest.models:
            raise UnknownModelError(f"unknown model {shown(name)}; choose from "
                                    f"{self.model_names}")
        loaded = self.registry.models.get(name)
        if loaded is None:
            raise ModelUnavailableError(f"model {name!r} is not available: it failed "
                                        "verification at start-up")
        return loaded

    def require_faces(self, mode: FacesMode) -> None:
        if mode != "none" and self.cropper is None:
            raise FacesUnavailableError("face detection is not available on this server; "
                                        "use faces=none")

    def model_inputs(self, decoded: DecodedImage, mode: FacesMode) -> ModelInputs:
        """The uint8 350x350 inputs an image gives, each with its face box (upload pixels).

        ``none``: the whole image. ``auto``: the largest face, else the whole image. ``all``:
        every face up to ``max_faces``, largest first, else the whole image.
        """
        return model_inputs(decoded, mode, self.cropper, self.hooks, self.max_faces)

    def predict(self, model_name: str, images: Sequence[ImageInput],
                mode: FacesMode = "none") -> list[ImagePrediction]:
        """CPU-bound. Per image, its predictions (one per face used) or its error, in order;
        every face of every image goes through one model call."""
        loaded = self.model(model_name)
        self.require_faces(mode)
        # Each image becomes its 350x350 inputs as soon as it is decoded, so a batch of large
        # uploads is never held at full size all at once.
        inputs: list[ModelInputs | PreprocessingError] = []
        for image in images:
            try:
                if image.error is not None:
                    raise image.error
                decoded = decode_grayscale(image.data or b"", self.limits)
            except PreprocessingError as exc:
                # kept without its traceback: through its frames, which lead back here, it
                # held every upload of the request until a full collection (47 MB more per
                # request of 16 with one bad image; a diff review)
                exc.__traceback__ = exc.__context__ = None
                inputs.append(exc)
                self.hooks.on_rejected(exc.code)
                continue
            inputs.append(self.model_inputs(decoded, mode))
            del decoded
        return self._classify(loaded, [i.name for i in images], inputs)

    def predict_decoded(self, model_name: str, names: Sequence[str | None],
                        images: Sequence[DecodedImage | PreprocessingError],
                        mode: FacesMode = "none") -> list[ImagePrediction]:
        """:meth:`predict` for images already decoded to grayscale (video frames, say)."""
        loaded = self.model(model_name)
        self.require_faces(mode)
        return self._classify(loaded, names, [
            image if isinstance(image, PreprocessingError) else self.model_inputs(image, mode)
            for image in images])

    def _classify(self, loaded: LoadedModel, names: Sequence[str | None],
                  inputs: Sequence[ModelInputs | PreprocessingError]
                  ) -> list[ImagePrediction]:
        faces: list[list[FacePrediction] | PreprocessingError] = []
        arrays, owners = [], []  # owners[k]: (image index, face box) of arrays[k]
        for i, item in enumerate(inputs):
            if isinstance(item, PreprocessingError):
                faces.append(item)
                continue
            for pixels, face in item.crops:
                arrays.append(pixels)
                owners.append((i, face))
            faces.append([])
        if arrays:
            probabilities = self.probabilities(loaded, pixels_to_input(np.stack(arrays)))
            self.count_predictions(loaded.name, probabilities)
            for (i, face), row in zip(owners, probabilities, strict=True):
                faces[i].append(FacePrediction(int(np.argmax(row)), row, face))
        return [ImagePrediction(name, error=result) if isinstance(result, Exception)
                else ImagePrediction(name, tuple(result), faces_found=item.faces_found)
                for name, result, item in zip(names, faces, inputs, strict=True)]

    def count_predictions(self, model_name: str, probabilities: np.ndarray) -> None:
        """The served labels and their probabilities, for the metrics, whichever protocol
        asked."""
        for row in probabilities:
            label_id = int(np.argmax(row))
            self.hooks.on_prediction(model_name, CLASS_NAMES[label_id], float(row[label_id]))

    def probabilities(self, model: LoadedModel | str, batch: np.ndarray) -> np.ndarray:
        """float32 ``[N, 350, 350]`` model inputs in [0, 1] -> probabilities ``[N, 8]``."""
        loaded = self.model(model) if isinstance(model, str) else model
        started = time.perf_counter()
        out = loaded.classifier.predict_proba(batch)
        self.hooks.on_inference(loaded.name, time.perf_counter() - started)
        return out

    def preprocess(self, image: ImageInput, mode: FacesMode = "none") -> np.ndarray:
        """One model input, float32 [350, 350], for an image: the whole image, or its largest
        face for ``auto``. Raises :class:`PreprocessingError`."""
        if mode == "all":
            raise ValueError("faces=all gives several inputs per image")
        self.require_faces(mode)
        try:
            if image.error is not None:
                raise image.error
            decoded = decode_grayscale(image.data or b"", self.limits)
        except PreprocessingError as exc:
            self.hooks.on_rejected(exc.code)
            raise
        return pixels_to_input(self.model_inputs(decoded, mode).crops[0][0])


def model_inputs(decoded: DecodedImage, mode: FacesMode, cropper: FaceCropper | None,
                 hooks: PredictionHooks | None = None, max_faces: int = 16) -> ModelInputs:
    """See :meth:`Predictor.model_inputs` (also what ``face-geometry`` measures)."""
    if mode == "none" or cropper is None:
        return ModelInputs([(resize_to_input(decoded.gray), None)])
    faces = cropper.faces(decoded.gray)
    chosen = faces[:1] if mode == "auto" else faces[:max_faces]
    if hooks is not None:
        hooks.on_faces(len(chosen))
    if not faces:
        return ModelInputs([(resize_to_input(decoded.gray), None)], faces_found=0)
    sx, sy = decoded.scale
    return ModelInputs([(resize_to_input(cropper.crop(decoded.gray, face)),
                         face.scaled(sx, sy)) for face in chosen], faces_found=len(faces))
