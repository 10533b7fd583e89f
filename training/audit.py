"""``python -m training audit``: what is really in the dataset, and the tables built from it.

Writes ``data/audit.json`` (for code), ``data/audit.md`` (for people), the clean table
``data/clean.csv`` and the splits ``data/splits/{identity,random}.csv``. Every figure is
computed; nothing in the output depends on the time or the machine, so a rerun is
byte-identical.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from service.classes import CLASS_NAMES
from training.dataset import clean_legend, read_legend
from training.files import replace_text
from training.settings import TrainingSettings
from training.splits import (
    SPLIT_SEED,
    class_counts_by_subset,
    identity_split,
    random_split,
    split_frame,
    write_split,
)

# The study's table of case-normalised class counts over all 13,690 legend rows.
STUDY_CLASS_COUNTS = dict(zip(CLASS_NAMES, (252, 368, 208, 21, 6868, 5696, 268, 9), strict=True))
EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF",
                     ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}

IDENTITY_RULE = (
    "Identity comes from the file name: strip the extension and a trailing number "
    "(with or without '_' before it), keep only the letters, lowercased "
    "(George_W_Bush_0001.jpg -> georgewbush; HrithikRoshan_12.jpg and "
    "Hrithik_Roshan_0001.jpg -> hrithikroshan). The four stock photos of contributor 628 "
    "(facial-expressions_NNNNNNNk.jpg) carry no name and look like one model's series: they "
    "form one identity. Identities whose images include byte-identical files are joined "
    "into one group named 'a+b'."
)


def inspect_image(path: Path) -> dict:
    """Header facts, plus whether a colour image really has colour (decoding only those)."""
    with Image.open(path) as image:
        facts = {"format": image.format, "mode": image.mode,
                 "width": image.size[0], "height": image.size[1]}
        if image.mode not in ("L", "1", "I", "I;16", "F"):
            rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
            spread = np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).max()
            facts["has_colour"] = bool(spread > 8)
        else:
            facts["has_colour"] = False
    return facts


def run_audit(settings: TrainingSettings, out_dir: Path | None = None,
              splits_dir: Path | None = None, seed: int = SPLIT_SEED) -> dict:
    out_dir = out_dir or settings.data_dir
    splits_dir = splits_dir or settings.splits_dir
    legend = read_legend(settings.legend_path)
    cleaned = clean_legend(legend, settings.images_dir)
    table = cleaned.table

    spellings = Counter(legend["emotion"])
    class_counts = {name: int((legend["label"] == name).sum()) for name in CLASS_NAMES}

    facts = {name: inspect_image(settings.images_dir / name) for name in table["image"]}
    mismatched = [
        {"image": name, "extension": os.path.splitext(name)[1].lower(), "format": f["format"]}
        for name, f in sorted(facts.items())
        if EXTENSION_FORMATS.get(os.path.splitext(name)[1].lower()) != f["format"]
    ]
    modes = Counter(f["mode"] for f in facts.values())
    shapes = Counter(f"{f['width']}x{f['height']}" for f in facts.values())
    colour = sum(f["has_colour"] for f in facts.values())

    per_identity = table.groupby("identity").size().sort_values(ascending=False, kind="stable")
    sizes = Counter(per_identity.tolist())
    per_contributor = pd.crosstab(table["contributor"], table["label"]).reindex(
        columns=list(CLASS_NAMES), fill_value=0)

    splits = {"identity": split_frame(table, identity_split(table, seed)),
              "random": split_frame(table, random_split(table, seed))}
    for name, frame in splits.items():
        leaks = int((frame.groupby("identity")["split"].nunique() > 1).sum())
        splits[name] = (frame, leaks)

    report = {
        "dataset_dir_name": settings.dataset_dir.name,
        "legend_rows": len(legend),
        "distinct_images_in_legend": int(legend["image"].nunique()),
        "label_spellings": dict(sorted(spellings.items(), key=lambda kv: (-kv[1], kv[0]))),
        "class_counts": class_counts,
        "class_counts_match_study": class_counts == STUDY_CLASS_COUNTS,
        "duplicate_rows_agreeing": {
            "count": len(cleaned.duplicate_rows_agreeing),
            "rule": "kept once, with the contributor of its first row",
            "rows": cleaned.duplicate_rows_agreeing},
        "duplicate_rows_conflicting": {
            "count": len(cleaned.duplicate_rows_conflicting),
            "rule": "dropped: the true label is unknown",
            "rows": cleaned.duplicate_rows_conflicting},
        "missing_files": {"count": len(cleaned.missing_files), "rule": "row dropped",
                          "images": cleaned.missing_files},
        "identical_files": {
            "groups": len(cleaned.identical_file_groups),
            "rule": "both kept; their identities joined into one group",
            "images": cleaned.identical_file_groups},
        "format_mismatches": {"count": len(mismatched), "rule": "kept: decoded by content",
                              "images": mismatched},
        "modes": dict(sorted(modes.items())),
        "colour_images": colour,
        "grayscale_images": len(facts) - colour,
        "distinct_shapes": len(shapes),
        "most_common_shapes": dict(shapes.most_common(10)),
        "square_images": sum(f["width"] == f["height"] for f in facts.values()),
        "kept_images": len(table),
        "kept_class_counts": {n: int((table["label"] == n).sum()) for n in CLASS_NAMES},
        "identity_rule": IDENTITY_RULE,
        "identities": int(per_identity.size),
        "images_per_identity": {
            "max": int(per_identity.max()), "median": float(per_identity.median()),
            "mean": round(float(per_identity.mean()), 3),
            "histogram": {str(k): int(v) for k, v in sorted(sizes.items())[:10]},
            "top": {k: int(v) for k, v in per_identity.head(10).items()}},
        "class_counts_by_contributor": {
            str(c): {n: int(v) for n, v in row.items()} for c, row in per_contributor.iterrows()},
        "split_seed": seed,
        "splits": {
            name: {"identities_in_two_subsets": leaks,
                   "subset_sizes": {s: int((frame["split"] == s).sum())
                                    for s in ("train", "val", "test")},
                   "class_counts": {label: {s: int(v) for s, v in row.items()}
                                    for label, row in class_counts_by_subset(frame).iterrows()}}
            for name, (frame, leaks) in splits.items()},
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    replace_text(out_dir / settings.clean_table.name,
                 table.to_csv(index=False, lineterminator="\n"))
    for name, (frame, _) in splits.items():
        write_split(frame, splits_dir / f"{name}.csv")
    replace_text(out_dir / "audit.json", json.dumps(report, indent=2) + "\n")
    replace_text(out_dir / "audit.md", render_markdown(report))
    return report


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(r: dict) -> str:
    study = STUDY_CLASS_COUNTS
    parts = [
        "# Dataset audit",
        "",
        "Generated by `python -m training audit` from the legend and every image; do not edit.",
        "",
        "## Headline",
        "",
        markdown_table(["what", "value"], [
            ["legend rows", r["legend_rows"]],
            ["distinct images named", r["distinct_images_in_legend"]],
            ["label spellings", len(r["label_spellings"])],
            ["duplicate rows that agree (kept once)", r["duplicate_rows_agreeing"]["count"]],
            ["duplicate rows that conflict (dropped)", r["duplicate_rows_conflicting"]["count"]],
            ["legend rows whose file is missing", r["missing_files"]["count"]],
            ["byte-identical file groups (identities joined)", r["identical_files"]["groups"]],
            ["files whose format disagrees with the extension",
             r["format_mismatches"]["count"]],
            ["colour images / grayscale images",
             f"{r['colour_images']} / {r['grayscale_images']}"],
            ["distinct shapes", r["distinct_shapes"]],
            ["square images", r["square_images"]],
            ["kept images (clean table)", r["kept_images"]],
            ["identity groups", r["identities"]],
        ]),
        "",
        "## Classes",
        "",
        "Case-normalised counts over all legend rows, against the study's table "
        f"(match: **{r['class_counts_match_study']}**).",
        "",
        markdown_table(["id", "class", "rows", "study", "kept"], [
            [i, n, r["class_counts"][n], study[n], r["kept_class_counts"][n]]
            for i, n in enumerate(CLASS_NAMES)]),
        "",
        "Label spellings as published: "
        + ", ".join(f"`{k}` {v}" for k, v in r["label_spellings"].items()) + ".",
        "",
        "## Cleaning rules applied",
        "",
        f"- Duplicate rows that agree: {r['duplicate_rows_agreeing']['rule']}: "
        + ", ".join(d["image"] for d in r["duplicate_rows_agreeing"]["rows"]) + ".",
        f"- Duplicate rows that conflict: {r['duplicate_rows_conflicting']['rule']}: "
        + ", ".join(f"{d['image']} (lines {d['lines']}, {'/'.join(d['labels'])})"
                    for d in r["duplicate_rows_conflicting"]["rows"]) + ".",
        f"- Missing files: {r['missing_files']['rule']} ({r['missing_files']['count']}).",
        f"- Byte-identical files: {r['identical_files']['rule']}: "
        + "; ".join(" = ".join(g) for g in r["identical_files"]["images"]) + ".",
        f"- Format mismatches: {r['format_mismatches']['rule']}: "
        + ", ".join(f"{m['image']} is {m['format']}" for m in r["format_mismatches"]["images"])
        + ".",
        "",
        "## Images",
        "",
        "Pillow modes: " + ", ".join(f"{k} {v}" for k, v in r["modes"].items())
        + ". Colour (an RGB image with a channel more than 8 levels from its pixel's mean of "
        f"the three somewhere): {r['colour_images']}.",
        "",
        markdown_table(["shape (WxH)", "images"], list(r["most_common_shapes"].items())),
        "",
        "## Identities",
        "",
        r["identity_rule"],
        "",
        f"{r['identities']} groups; images per group: max {r['images_per_identity']['max']}, "
        f"median {r['images_per_identity']['median']}, mean {r['images_per_identity']['mean']}. "
        "Groups by size: " + ", ".join(f"{v} with {k}" for k, v in
                                       r["images_per_identity"]["histogram"].items()) + ".",
        "",
        markdown_table(["identity", "images"], list(r["images_per_identity"]["top"].items())),
        "",
        "## Classes per contributor (`user.id`)",
        "",
        markdown_table(["contributor", *CLASS_NAMES], [
            [c, *counts.values()] for c, counts in r["class_counts_by_contributor"].items()]),
        "",
        "## Splits",
        "",
        f"Seed {r['split_seed']}. `identity.csv`: no identity group in two subsets, classes "
        "stratified as far as the groups allow (StratifiedGroupKFold); `random.csv`: the "
        "study's kind, stratified by class, blind to identity.",
        "",
    ]
    parts_fer = [
        "## FER-2013",
        "",
        "The second dataset has its own audit, written from the full release: "
        "[fer2013_audit.md](fer2013_audit.md) (counts per usage and class, duplicates by "
        "content within FER-2013 and against this dataset).",
        "",
    ]
    for name, s in r["splits"].items():
        parts += [
            f"### {name}.csv: sizes "
            + ", ".join(f"{k} {v}" for k, v in s["subset_sizes"].items())
            + f"; identities in two subsets: {s['identities_in_two_subsets']}",
            "",
            markdown_table(["class", "train", "val", "test"], [
                [label, c["train"], c["val"], c["test"]]
                for label, c in s["class_counts"].items()]),
            "",
        ]
    return "\n".join(parts + parts_fer)
