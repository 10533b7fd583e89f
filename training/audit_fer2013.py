"""The FER-2013 section of the audit: what the release holds, and duplicates by content.

Written to ``data/fer2013_audit.{json,md}`` from the full release only (``python -m training
fetch fer2013``); with the shared copy alone (PublicTest) the counts are checked against the
checksum list instead. Duplicates are found in two ways:

* exact: the same decoded 8-bit pixels (the SHA-256 of the pixels, so re-encoded JPEGs of one
  picture match), within FER-2013;
* near: z-normalised 24x24 thumbnails of the 350x350 model inputs (so both datasets are
  compared after the same preprocessing) whose cosine is at least :data:`NEAR_COSINE`, within
  FER-2013 and against this dataset.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from service.classes import CLASS_NAMES
from service.preprocessing import INPUT_SIZE
from training.audit import markdown_table
from training.cache import DecodedImages, load_decoded_images
from training.dataset import read_clean_table
from training.fer2013 import (
    FER_COMMIT,
    FER_REPOSITORY,
    USAGE_OF_FOLDER,
    fer_table,
    is_full_release,
    parse_original,
    pixel_digests,
)
from training.fetch import read_checksums
from training.files import replace_text
from training.settings import DATASET_HINT, TrainingSettings

THUMBNAIL = 24
NEAR_COSINE = 0.98
USAGES = tuple(USAGE_OF_FOLDER.values())
FER_CLASS_NAMES = [n for n in CLASS_NAMES if n != "CONTEMPT"]


def release_counts(checksums_path: Path) -> dict[str, dict[str, int]]:
    """Images per usage and class, as the checksum list (the whole release) has them."""
    counts = Counter()
    for name in read_checksums(checksums_path):
        facts = parse_original(name)
        counts[(facts["usage"], facts["label"])] += 1
    return {u: {c: counts[(u, c)] for c in FER_CLASS_NAMES} for u in USAGES}


def thumbnails(decoded: DecodedImages, rows: np.ndarray, size: int = THUMBNAIL,
               chunk: int = 1024) -> np.ndarray:
    """float32 ``[n, size*size]``: block means of the central crop, zero mean, unit norm."""
    block = INPUT_SIZE // size
    margin = (INPUT_SIZE - block * size) // 2
    parts = []
    for start in range(0, len(rows), chunk):
        pixels = np.asarray(decoded.pixels[rows[start:start + chunk]], dtype=np.float32)
        crop = pixels[:, margin:margin + block * size, margin:margin + block * size]
        small = crop.reshape(len(crop), size, block, size, block).mean(axis=(2, 4))
        flat = small.reshape(len(small), -1)
        flat -= flat.mean(1, keepdims=True)
        norms = np.linalg.norm(flat, axis=1, keepdims=True)
        parts.append(flat / np.maximum(norms, 1e-6))
    return np.concatenate(parts)


def near_pairs(a: np.ndarray, b: np.ndarray, threshold: float = NEAR_COSINE,
               same: bool = False, chunk: int = 1024) -> list[tuple[int, int, float]]:
    """Index pairs (i in a, j in b) whose cosine is at least ``threshold`` (i < j if same)."""
    pairs = []
    for start in range(0, len(a), chunk):
        sims = a[start:start + chunk] @ b.T
        for i, j in zip(*np.nonzero(sims >= threshold), strict=True):
            if not same or start + i < j:
                pairs.append((int(start + i), int(j), round(float(sims[i, j]), 4)))
    return pairs


def exact_duplicate_groups(table: pd.DataFrame, digests: list[str]) -> list[list[str]]:
    frame = table.assign(pixels=digests)
    return sorted(sorted(g["image"]) for _, g in frame.groupby("pixels") if len(g) > 1)


def summarise_groups(groups: list[list[str]], label_of: dict[str, str]) -> dict:
    usage_of = {name: parse_original(name)["usage"] for g in groups for name in g}
    spans = Counter("+".join(sorted({usage_of[n] for n in g})) for g in groups)
    conflicting = [g for g in groups if len({label_of[n] for n in g}) > 1]
    return {"groups": len(groups), "images": sum(len(g) for g in groups),
            "by_usages": dict(sorted(spans.items())),
            "with_conflicting_labels": len(conflicting)}


def run_fer_audit(settings: TrainingSettings, out_dir: Path | None = None) -> dict:
    """The report; written to ``out_dir`` (default data/) when the full release is present."""
    out_dir = out_dir or settings.data_dir
    table = fer_table(settings.fer2013_dir, settings.fer2013_checksums)
    release = release_counts(settings.fer2013_checksums)
    present = {u: {c: int(((table["usage"] == u) & (table["label"] == c)).sum())
                   for c in FER_CLASS_NAMES} for u in USAGES}
    label_of = dict(zip(table["image"], table["label"], strict=True))

    exact = exact_duplicate_groups(table, pixel_digests(settings.fer2013_dir,
                                                        list(table["image"])))
    fer_decoded = load_decoded_images(table, settings.fer2013_dir, settings.cache_dir,
                                      listed_in=settings.fer2013_checksums.name)
    fer_thumbs = thumbnails(fer_decoded, np.arange(len(table)))
    within = near_pairs(fer_thumbs, fer_thumbs, same=True)
    ours = read_clean_table(settings.clean_table)
    ours_decoded = load_decoded_images(ours, settings.images_dir, settings.cache_dir,
                                       listed_in=settings.clean_table.name, hint=DATASET_HINT)
    across = near_pairs(thumbnails(ours_decoded, np.arange(len(ours))), fer_thumbs)
    names = list(table["image"])
    report = {
        "repository": FER_REPOSITORY, "commit": FER_COMMIT,
        "complete": is_full_release(table, settings.fer2013_checksums),
        "release_counts": release, "present_counts": present,
        "exact_duplicates": {
            "rule": "the same decoded pixels",
            **summarise_groups(exact, label_of), "members": exact},
        "near_duplicates_within": {
            "rule": f"cosine of z-normalised {THUMBNAIL}x{THUMBNAIL} thumbnails >= "
                    f"{NEAR_COSINE}",
            "pairs": len(within),
            "pairs_by_usages": dict(sorted(Counter(
                "+".join(sorted({parse_original(names[i])["usage"],
                                 parse_original(names[j])["usage"]}))
                for i, j, _ in within).items())),
            "pairs_with_different_labels": sum(label_of[names[i]] != label_of[names[j]]
                                               for i, j, _ in within)},
        "near_duplicates_against_facial_expressions": {
            "rule": f"the same thumbnails of both datasets' model inputs, cosine >= "
                    f"{NEAR_COSINE}",
            "pairs": len(across),
            "members": [{"facial_expressions": ours["image"][i], "fer2013": names[j],
                         "cosine": s} for i, j, s in across]},
    }
    if report["complete"]:
        out_dir.mkdir(parents=True, exist_ok=True)
        replace_text(out_dir / "fer2013_audit.json", json.dumps(report, indent=2) + "\n")
        replace_text(out_dir / "fer2013_audit.md", render_fer_markdown(report))
    return report


def render_fer_markdown(r: dict) -> str:
    exact, within = r["exact_duplicates"], r["near_duplicates_within"]
    across = r["near_duplicates_against_facial_expressions"]
    return "\n".join([
        "# FER-2013 audit",
        "",
        "Generated by `python -m training audit` from the full release; do not edit. The "
        f"release: {r['repository']} at `{r['commit']}`, only the files named "
        "`<Usage>_<n>.jpg`, each checked against `data/fer2013.SHA256SUMS`.",
        "",
        "## Images per usage and class",
        "",
        markdown_table(["usage", *FER_CLASS_NAMES, "all"], [
            [u, *counts.values(), sum(counts.values())]
            for u, counts in r["present_counts"].items()]),
        "",
        "No CONTEMPT: FER-2013 has seven classes. Counts equal the checksum list's: "
        f"**{r['present_counts'] == r['release_counts']}**.",
        "",
        "## Duplicates by content",
        "",
        f"- Exact ({exact['rule']}): {exact['groups']} groups holding {exact['images']} "
        f"images; {exact['with_conflicting_labels']} groups disagree on the label. Groups by "
        "the usages they span: " + ", ".join(f"{k} {v}" for k, v in exact["by_usages"].items())
        + ".",
        f"- Near ({within['rule']}): {within['pairs']} pairs, "
        f"{within['pairs_with_different_labels']} with different labels; by usages: "
        + ", ".join(f"{k} {v}" for k, v in within["pairs_by_usages"].items()) + ".",
        f"- Against this project's dataset ({across['rule']}): {across['pairs']} pairs"
        + (": " + ", ".join(f"{m['facial_expressions']} ~ {m['fer2013']} ({m['cosine']})"
                            for m in across["members"][:20]) if across["pairs"] else "")
        + ".",
        "",
        "Kept as released: the challenge's protocol scores PrivateTest as it is, duplicates "
        "included, and fer's published figure is measured that way.",
        "",
    ])
