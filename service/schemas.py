"""Response models, with the examples that /docs shows."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.classes import CLASS_NAMES

_EXAMPLE_PROBS = dict(zip(CLASS_NAMES, (0.01, 0.02, 0.0, 0.0, 0.05, 0.9, 0.01, 0.01), strict=True))


class FaceBox(BaseModel):
    x: int = Field(description="Left edge, in the upload's own (upright) pixels.")
    y: int = Field(description="Top edge.")
    width: int
    height: int


class Prediction(BaseModel):
    filename: str | None = Field(None, description="As uploaded; null for a raw body.")
    face: FaceBox | None = Field(None, description="The face classified, when faces=auto or "
                                                   "all found one; null for the whole image.")
    label: str | None = Field(None, description="The most probable emotion.")
    label_id: int | None = Field(None, description="Its index in /classes.")
    probabilities: dict[str, float] | None = Field(None, description="All eight classes.")
    faces_found: int | None = Field(
        None, description="With faces=auto or all: how many faces the detector found in this "
        "image (the same on each of its predictions). auto classifies the largest; all at "
        "most EMOTION_MAX_FACES_PER_IMAGE, largest first, so more found than listed means the "
        "rest were left out. Null with faces=none.")
    error: str | None = Field(None, description="Why this image was not classified.")
    code: str | None = Field(None, description="Stable error code, with error.")


class PredictResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "model": "cnn", "model_sha256": "9f2c...e1", "latency_ms": 6.1,
        "predictions": [{"filename": "face.jpg", "label": "HAPPINESS", "label_id": 5,
                         "face": {"x": 212, "y": 96, "width": 180, "height": 180},
                         "probabilities": _EXAMPLE_PROBS, "error": None, "code": None}]}})
    model: str
    model_sha256: str
    predictions: list[Prediction]
    latency_ms: float = Field(description="Server time for the whole request.")


class ClassInfo(BaseModel):
    id: int
    name: str


class HealthResponse(BaseModel):
    status: str


class ReadinessResponse(BaseModel):
    ready: bool
    models: dict[str, str] = Field(description="Model name -> 'ready' or why it was refused.")
    faces: str = Field("ready", description="The face detector: 'ready' or why not.")
    draining: bool = Field(False, description="SIGTERM received: finishing, taking no more.")


class ModelPublic(BaseModel):
    name: str
    file: str
    sha256: str
    bytes: int
    kind: str
    description: str
    input: dict
    output: dict
    classes: list[str]
    preprocessing_version: str
    recipe: dict
    data: dict
    code_commit: str
    created_at: str
    loaded: bool
    default: bool = Field(description="The model a request that names none gets "
                          "(EMOTION_DEFAULT_MODEL).")
    test_macro_f1: dict[str, float] = Field(default_factory=dict, description="Evaluation "
                                            "set -> macro-F1 on its test subset.")
    summary: dict
