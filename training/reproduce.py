"""``python -m training reproduce``: every experiment of the study, judged on held-out data.

Each experiment is trained and evaluated on both splits (``identity``, the headline, and
``random``, the study's protocol) and writes ``reports/<experiment>/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from service.classes import CLASS_NAMES
from training.data import SPLIT_NAMES, Workspace
from training.evaluate import classification_metrics
from training.experiments import EXPERIMENTS, Experiment, for_profile
from training.knn import sweep_k
from training.models import EmotionNet
from training.provenance import code_commit, machine
from training.report import plot_confusion, plot_curves, write_reports_readme
from training.settings import TrainingSettings
from training.splits import SUBSETS
from training.train import LabelledImages, fit, predict_logits, resolve_device, seed_everything


def run_cnn(exp: Experiment, ws: Workspace, split: str, seed: int, device: torch.device):
    subsets = ws.subsets(split)
    images = ws.pooled(split, exp.model)
    seed_everything(seed)
    model = EmotionNet(exp.model)
    body, history = fit(model.body, exp.train,
                        LabelledImages(images["train"], subsets["train"].labels),
                        LabelledImages(images["val"], subsets["val"].labels, name="val"),
                        seed, device)
    metrics = {name: classification_metrics(
        subsets[name].labels, predict_logits(body, images[name], device).argmax(1))
        for name in SUBSETS}
    return metrics, {"history": history}


def run_knn(exp: Experiment, ws: Workspace, split: str, seed: int):
    subsets = ws.subsets(split)
    feats = ws.features(split)
    pipeline, best, sweep = sweep_k(feats["train"], subsets["train"].labels, feats["val"],
                                    exp.knn_ks, seed=seed, val_y=subsets["val"].labels)
    metrics = {name: classification_metrics(subsets[name].labels,
                                            pipeline[1:].predict(feats[name]))
               for name in SUBSETS}
    return metrics, {"chosen": best, "sweep": sweep}


def summarise(per_seed: dict[int, dict]) -> dict:
    """Mean and standard deviation over seeds of the headline numbers, per subset."""
    summary = {}
    for subset in SUBSETS:
        runs = [per_seed[s][subset] for s in per_seed]

        def stat(values):
            return {"mean": float(np.mean(values)), "std": float(np.std(values))}

        summary[subset] = {
            "accuracy": stat([r["accuracy"] for r in runs]),
            "macro_f1": stat([r["macro_f1"] for r in runs]),
            "per_class_f1": {c: stat([r["per_class"][c]["f1"] for r in runs])
                             for c in CLASS_NAMES},
            "per_class_recall": {c: stat([r["per_class"][c]["recall"] for r in runs])
                                 for c in CLASS_NAMES},
            "confusion_matrix_sum": np.sum([r["confusion_matrix"] for r in runs], 0).tolist(),
        }
    return summary


def run_experiment(exp: Experiment, ws: Workspace, device: torch.device, out_root: Path,
                   commit: str) -> dict:
    started = time.perf_counter()
    results, extras = {}, {}
    for split in SPLIT_NAMES:
        per_seed, split_extras = {}, {}
        for seed in exp.seeds:
            if exp.model is None:
                metrics, extra = run_knn(exp, ws, split, seed)
            else:
                metrics, extra = run_cnn(exp, ws, split, seed, device)
            per_seed[seed] = metrics
            split_extras[str(seed)] = extra
            print(f"  {exp.name} [{split}, seed {seed}] test macro-F1 "
                  f"{metrics['test']['macro_f1']:.3f}", flush=True)
        results[split] = {"summary": summarise(per_seed),
                          "seeds": {str(s): m for s, m in per_seed.items()}}
        extras[split] = split_extras
    wall = time.perf_counter() - started
    report = {
        "experiment": exp.name, "description": exp.description, "profile": ws.profile,
        "model": exp.model.to_dict() if exp.model else None,
        "train": exp.train.to_dict() if exp.train else None,
        "knn_ks": list(exp.knn_ks), "seeds": list(exp.seeds), "device": str(device),
        "wall_time_s": round(wall, 1), "code_commit": commit, "machine": machine(),
        "results": results, "training": extras,
    }
    folder = out_root / exp.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / "config.json").write_text(json.dumps(
        {"experiment": asdict(exp), "profile": ws.profile}, indent=1, default=str) + "\n")
    plot_confusion(report, folder / "confusion_test.png")
    plot_curves(report, folder / "curves.png")
    return report


def reproduce(settings: TrainingSettings, names: list[str] | None = None, profile: str = "full",
              device: str = "auto", out_root: Path | None = None) -> dict[str, dict]:
    # a smoke run never lands on the full results (it replaced reports/'s figures)
    out_root = out_root or (settings.reports_dir if profile == "full"
                            else settings.smoke_dir("reproduce"))
    chosen = names or list(EXPERIMENTS)
    unknown = set(chosen) - set(EXPERIMENTS)
    if unknown:
        raise SystemExit(f"unknown experiment(s) {sorted(unknown)}; "
                         f"choose from {list(EXPERIMENTS)}")
    out_root.mkdir(parents=True, exist_ok=True)  # refused now, not after the first training
    ws = Workspace(settings, profile)
    torch_device = resolve_device(device)
    commit = code_commit()  # the code that starts the run runs all of it, commits meanwhile or not
    started = time.perf_counter()
    reports = {}
    for name in chosen:
        exp = for_profile(EXPERIMENTS[name], profile)
        print(f"{name}: {exp.description}", flush=True)
        reports[name] = run_experiment(exp, ws, torch_device, out_root, commit)
        # after each, so that a run stopped part-way leaves a README that matches its metrics
        write_reports_readme(out_root)
        print(f"{name}: {reports[name]['wall_time_s']:.0f} s", flush=True)
    total = time.perf_counter() - started
    print(f"total wall time {total:.0f} s ({total / 60:.1f} min) on {torch_device}", flush=True)
    return reports
