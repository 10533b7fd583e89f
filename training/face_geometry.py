"""Learn where faces sit in the training crops, and measure ``faces=auto`` against ``none``.

``python -m training face-geometry`` exports the detector's networks to ``models/``
(``training/face_detector.py``), runs the service's own detector over every train-split
crop (from the decode cache: exactly the 350x350 images the models learn from), takes the
median placement of the face box among crops with exactly one face, and writes it with the
detector's settings to ``models/face_crop.json``. It then classifies the identity split's
val and test images from their files, through the service's own code path, with the whole
image (``none``) and with the detected face cropped to that geometry (``auto``), and records
both macro-F1 values: the service's default is whichever does not lower them.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.faces import (
    FACE_CROP_FILE,
    CropGeometry,
    DetectorConfig,
    FaceCropper,
    FaceCropSpec,
    FaceDetector,
    NetworkFile,
)
from service.inference import model_inputs
from service.manifest import load_manifest
from service.models import OnnxClassifier
from service.preprocessing import INPUT_SIZE, decode_grayscale, pixels_to_input
from training.data import open_cache, read_subsets
from training.evaluate import classification_metrics
from training.face_detector import FACENET_VERSION, export_networks
from training.fetch import sha256_file
from training.provenance import code_commit
from training.settings import DataSettings


def learn_geometry(settings: DataSettings, detector: FaceDetector,
                   limit: int | None = None) -> tuple[CropGeometry, dict]:
    _, decoded = open_cache(settings)
    names = read_subsets("identity")["train"].names[:limit]
    rows = decoded.rows_of(names)
    found, relative = [], []
    for row in tqdm(rows, desc="faces in train crops", mininterval=5):
        boxes = detector.detect(np.asarray(decoded.pixels[row]))
        found.append(len(boxes))
        if len(boxes) == 1:
            b = boxes[0]
            relative.append(((b.x + b.width / 2) / INPUT_SIZE, (b.y + b.height / 2) / INPUT_SIZE,
                             b.width / INPUT_SIZE, b.height / INPUT_SIZE))
    stats = np.array(relative)
    median = np.median(stats, axis=0)
    q1, q3 = np.percentile(stats, [25, 75], axis=0)
    geometry = CropGeometry(center_x=median[0], center_y=median[1], width=median[2],
                            height=median[3])
    found = np.array(found)
    learned = {
        "split": "identity", "subset": "train", "images": int(len(found)),
        "detector": f"MTCNN from facenet-pytorch {FACENET_VERSION}, ONNX Runtime",
        "share_with_a_face": round(float((found >= 1).mean()), 4),
        "share_with_exactly_one_face": round(float((found == 1).mean()), 4),
        "interquartile_range": {key: [round(float(a), 4), round(float(b), 4)] for key, a, b in
                                zip(("center_x", "center_y", "width", "height"), q1, q3,
                                    strict=True)},
    }
    return geometry, learned


def evaluate_modes(settings: DataSettings, cropper: FaceCropper, models_dir: Path,
                   limit: int | None = None) -> dict:
    manifest = load_manifest(models_dir)
    entry = manifest.models["cnn"]
    model = OnnxClassifier((models_dir / entry.file).read_bytes(), entry, threads=0)
    subsets = read_subsets("identity")
    out: dict = {"model": "cnn", "model_sha256": entry.sha256, "split": "identity"}
    for subset in ("val", "test"):
        names, labels = subsets[subset].names[:limit], subsets[subset].labels[:limit]
        inputs: dict[str, list[np.ndarray]] = {"none": [], "auto": []}
        faces_found = 0
        for name in tqdm(names, desc=f"{subset} images, none and auto", mininterval=5):
            decoded = decode_grayscale((settings.images_dir / name).read_bytes())
            inputs["none"].append(model_inputs(decoded, "none", cropper)[0][0])
            pixels, face = model_inputs(decoded, "auto", cropper)[0]
            inputs["auto"].append(pixels)
            faces_found += face is not None
        result = {"images": len(names), "share_with_a_face": round(faces_found / len(names), 4)}
        for mode, arrays in inputs.items():
            predicted = np.concatenate([
                model.predict_proba(pixels_to_input(np.stack(arrays[i:i + 256]))).argmax(1)
                for i in range(0, len(arrays), 256)])
            metrics = classification_metrics(labels, predicted)
            result[mode] = {key: round(metrics[key], 4) for key in (
                "macro_f1", "macro_f1_six_large_classes", "accuracy")}
        out[subset] = result
    return out


def export_detector(settings: DataSettings, models_dir: Path) -> DetectorConfig:
    """The detector's ONNX files in ``models_dir`` and a configuration naming them."""
    paths = export_networks(settings.cache_dir / "pretrained", models_dir)
    return DetectorConfig(networks={stage: NetworkFile(file=path.name, sha256=sha256_file(path))
                                    for stage, path in paths.items()})


def build_face_crop(settings: DataSettings, models_dir: Path,
                    limit: int | None = None) -> FaceCropSpec:
    started = time.perf_counter()
    config = export_detector(settings, models_dir)
    geometry, learned = learn_geometry(settings, FaceDetector(config, models_dir), limit)
    spec = FaceCropSpec(detector=config, geometry=geometry, learned_from=learned,
                        code_commit=code_commit(),
                        created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    spec.evaluation = evaluate_modes(settings, FaceCropper(spec, models_dir), models_dir, limit)
    spec.learned_from["seconds"] = round(time.perf_counter() - started, 1)
    return spec


def write_face_crop(spec: FaceCropSpec, models_dir: Path) -> Path:
    path = models_dir / FACE_CROP_FILE
    path.write_text(json.dumps(spec.model_dump(), indent=2) + "\n")
    return path
