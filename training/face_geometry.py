"""Learn where faces sit in the training images, and measure ``faces=auto`` against ``none``.

``python -m training face-geometry`` exports the detector's networks to ``models/``
(``training/face_detector.py``) and runs the service's own detector over the 350x350 model
inputs of both train sets (from the decode caches: exactly what the CNN learns from). The
median placement of the face box among images with exactly one face gives one candidate
framing per dataset, and their midpoint a third. Each candidate is scored on both validation
sets through the service's own code path (files decoded, face found, cropped, classified by
the shipped CNN); the one with the best mean of the two macro-F1s is kept. ``faces=none`` is
scored the same way, and the service's default is whichever mode scores higher: both go to
``models/face_crop.json``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
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
    face_crop_entry,
)
from service.inference import model_inputs
from service.manifest import MANIFEST_FILE, load_manifest
from service.models import OnnxClassifier
from service.preprocessing import INPUT_SIZE, decode_grayscale, pixels_to_input
from training.data import Workspace
from training.evaluate import macro_f1
from training.face_detector import FACENET_VERSION, export_networks
from training.fetch import sha256_file
from training.files import rename_into_place, sync, write_synced
from training.model_card import card_with_face_detector_note
from training.provenance import code_commit
from training.recipe import EVAL_SETS
from training.settings import TrainingSettings

# FER-2013 Training is large and its faces alike: a sample is enough for a median (every
# 7th image by path: every class, though surprise, last by path, at 351 where its share is 442).
FER_GEOMETRY_SAMPLE = 4000


def evenly_spaced(count: int, limit: int | None) -> np.ndarray:
    """Indices of ``limit`` items spread over all ``count`` (all of them without a limit)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.linspace(0, count - 1, limit).round().astype(int)


def learn_geometry(ws: Workspace, detector: FaceDetector, split: str,
                   limit: int | None = None) -> tuple[CropGeometry, dict]:
    decoded = ws.decoded_for(split)
    names = ws.subsets(split)["train"].names
    if limit is not None:
        # every (count // limit)th from the first, cut at limit, as the shipped face_crop.json
        # was learnt (FER-2013: 4,000): it leaves out the list's end (FER-2013's last 715
        # paths), which evenly_spaced would not; changing it would change the shipped framing
        names = names[:: max(1, len(names) // limit)][:limit]
    rows = decoded.rows_of(names)
    found, relative = [], []
    for row in tqdm(rows, desc=f"faces in {split} train images", mininterval=5):
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
        "split": split, "subset": "train", "images": int(len(found)),
        "detector": f"MTCNN from facenet-pytorch {FACENET_VERSION}, ONNX Runtime",
        "share_with_a_face": round(float((found >= 1).mean()), 4),
        "share_with_exactly_one_face": round(float((found == 1).mean()), 4),
        "interquartile_range": {key: [round(float(a), 4), round(float(b), 4)] for key, a, b in
                                zip(("center_x", "center_y", "width", "height"), q1, q3,
                                    strict=True)},
        "geometry": geometry.model_dump(),
    }
    return geometry, learned


def midpoint(a: CropGeometry, b: CropGeometry) -> CropGeometry:
    return CropGeometry(**{k: (getattr(a, k) + getattr(b, k)) / 2
                           for k in CropGeometry.model_fields})


def framing_source(learned: list[dict]) -> dict:
    """What the chosen framing was learned on, for the model card: the midpoint on both sets
    (it was credited to the identity split's crops alone, a review)."""
    images = sum(entry["images"] for entry in learned)
    return {"split": " and ".join(entry["split"] for entry in learned),
            "subset": learned[0]["subset"], "images": images,
            "share_with_a_face": round(sum(entry["share_with_a_face"] * entry["images"]
                                           for entry in learned) / images, 4)}


def score_mode(ws: Workspace, model: OnnxClassifier, cropper: FaceCropper | None,
               mode: str, limit: int | None = None) -> dict:
    """Macro-F1 of ``mode`` on each validation set, through the service's code path."""
    out = {}
    for name, (split, classes) in EVAL_SETS.items():
        val = ws.subsets(split)["val"]
        images_dir = (ws.settings.images_dir if split == "identity"
                      else ws.settings.fer2013_dir)
        # an evenly spaced sample over the whole set (names run by class): the first N
        # were one class of FER-2013's
        picked = evenly_spaced(len(val.names), limit)
        names = [val.names[i] for i in picked]
        labels = np.asarray(val.labels)[picked]
        inputs, faces_found = [], 0
        for image in tqdm(names, desc=f"{name} val, faces={mode}", mininterval=5):
            decoded = decode_grayscale((images_dir / image).read_bytes())
            pixels, face = model_inputs(decoded, mode, cropper).crops[0]
            inputs.append(pixels)
            faces_found += face is not None
        predicted = np.concatenate([
            model.predict_proba(pixels_to_input(np.stack(inputs[i:i + 256]))).argmax(1)
            for i in range(0, len(inputs), 256)])
        out[name] = {"images": len(names), "macro_f1": round(macro_f1(labels, predicted,
                                                                      classes), 4),
                     "share_with_a_face": round(faces_found / len(names), 4)}
    out["criterion"] = round(float(np.mean([out[n]["macro_f1"] for n in EVAL_SETS])), 4)
    return out


def export_detector(settings: TrainingSettings, out_dir: Path) -> DetectorConfig:
    """The detector's ONNX files in ``out_dir`` and a configuration naming them."""
    paths = export_networks(settings.pretrained_dir, out_dir)
    return DetectorConfig(networks={stage: NetworkFile(file=path.name, sha256=sha256_file(path))
                                    for stage, path in paths.items()})


@contextlib.contextmanager
def face_crop_staging(models_dir: Path) -> Iterator[Path]:
    """A folder in ``models_dir`` for what ``face-geometry`` writes until
    :func:`install_face_crop` moves it in; removed after, whatever happened."""
    staging = Path(tempfile.mkdtemp(prefix=".face-geometry.", dir=models_dir))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_face_crop(settings: TrainingSettings, models_dir: Path,
                    limit: int | None = None, *, staging: Path) -> FaceCropSpec:
    """The face detector (its ONNX files written in ``staging``) and its crop framing,
    measured with the CNN of ``models_dir``."""
    started = time.perf_counter()
    ws = Workspace(settings, "full")
    ws.require_fer()  # FER-2013 Training's framing; before the detector is written or run
    # the CNN that scores the framings too: a folder without one was a traceback after the
    # detector was written and run over both train sets (a review)
    manifest = load_manifest(models_dir)
    entry = manifest.models["cnn"]
    model = OnnxClassifier((models_dir / entry.file).read_bytes(), entry, threads=0)
    config = export_detector(settings, staging)
    detector = FaceDetector(config, staging)
    identity, learned_identity = learn_geometry(ws, detector, "identity", limit)
    fer, learned_fer = learn_geometry(ws, detector, "fer2013", limit or FER_GEOMETRY_SAMPLE)
    candidates = {"identity": identity, "fer2013": fer, "midpoint": midpoint(identity, fer)}
    scores = {"none": score_mode(ws, model, None, "none", limit)}
    specs = {}
    for name, geometry in candidates.items():
        specs[name] = FaceCropSpec(detector=config, geometry=geometry)
        scores[f"auto ({name} framing)"] = score_mode(
            ws, model, FaceCropper(specs[name], staging), "auto", limit)
    chosen = max(candidates, key=lambda n: scores[f"auto ({n} framing)"]["criterion"])
    auto = scores[f"auto ({chosen} framing)"]
    default = "auto" if auto["criterion"] > scores["none"]["criterion"] else "none"
    reason = (f"on the mean of the two validation macro-F1s, auto scores {auto['criterion']:.3f} "
              f"and none {scores['none']['criterion']:.3f}")
    spec = FaceCropSpec(
        detector=config, geometry=candidates[chosen],
        learned_from={"candidates": {"identity": learned_identity, "fer2013": learned_fer,
                                     "midpoint": candidates["midpoint"].model_dump()},
                      "chosen": chosen, **framing_source({
                          "identity": [learned_identity], "fer2013": [learned_fer],
                          "midpoint": [learned_identity, learned_fer]}[chosen])},
        code_commit=code_commit(), created_at=datetime.now(UTC).isoformat(timespec="seconds"))
    spec.evaluation = {
        "model": "cnn", "model_sha256": entry.sha256, "subset": "val",
        "sets": {name: {"val": {"none": {"macro_f1": scores["none"][name]["macro_f1"]},
                                "auto": {"macro_f1": auto[name]["macro_f1"]},
                                "share_with_a_face": auto[name]["share_with_a_face"]}}
                 for name in EVAL_SETS},
        "all_scores": scores, "default": default, "default_reason": reason,
    }
    spec.learned_from["seconds"] = round(time.perf_counter() - started, 1)
    return spec


def install_face_crop(spec: FaceCropSpec, models_dir: Path, staging: Path) -> Path:
    """``face_crop.json`` with the detector's files (in ``staging``), the model card's
    section on them and their entry in ``manifest.json`` (the service refuses them without),
    each written whole in ``staging`` and then renamed into ``models_dir``, the manifest last:
    a full disk or a stop before leaves the folder as it was. The manifest was rewritten in
    place, and cut it stopped the service and this command both (a review)."""
    write_synced(staging / FACE_CROP_FILE, json.dumps(spec.model_dump(), indent=2) + "\n")
    names = [network.file for network in spec.detector.networks.values()]
    for name in names:
        sync(staging / name)
    names.append(FACE_CROP_FILE)
    card = card_with_face_detector_note(models_dir, staging)
    if card is not None:
        write_synced(staging / "README.md", card)
        names.append("README.md")
    manifest = load_manifest(models_dir)
    manifest.face_detector = face_crop_entry(staging)
    write_synced(staging / MANIFEST_FILE, manifest.model_dump_json(indent=1) + "\n")
    rename_into_place([(staging / name, models_dir / name) for name in [*names, MANIFEST_FILE]])
    return models_dir / FACE_CROP_FILE
