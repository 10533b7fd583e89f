"""The study's experiments as plain configuration, one entry each.

The chain the study tried: a 1-conv baseline; random re-sampling to 300 per class;
augmentation to 3,000 per class for the minority classes; balanced class weights before and
after augmentation; a final 3-stage CNN with dropout; kNN (best k=101); and, from its future
work, a soft-F1 loss. The re-sampling, augmentation and weighting experiments use the
baseline network, as the study did before it changed the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from training.models import ModelConfig
from training.train import TrainConfig

# The study's networks run at 70x70 inside (350 / 5): about two thirds of the cost of 88x88.
STUDY_POOL = dict(pool=5, pad=0)
BASELINE = ModelConfig(arch="baseline", channels=(16,), **STUDY_POOL)
FINAL = ModelConfig(arch="final", channels=(32, 64, 128), hidden=128, dropout=0.5, **STUDY_POOL)
KNN_KS = (1, 5, 11, 21, 51, 101, 201)
# 8 epochs keep the whole full profile inside its 60-minute budget on 2 cores with margin:
# the last full run took 48.6 min (reports/README.md), the final CNN about 25 s per epoch
# and split. (An earlier run at 12 epochs took 91 min while sharing the CPU with training.)
FINAL_EPOCHS = 8


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    model: ModelConfig | None = None     # None: kNN
    train: TrainConfig | None = None
    seeds: tuple[int, ...] = (0,)
    knn_ks: tuple[int, ...] = ()


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in [
    Experiment("baseline", "1-conv baseline CNN on the imbalanced data",
               BASELINE, TrainConfig(epochs=10)),
    Experiment("sampling300", "baseline CNN, random under/over-sampling to 300 per class",
               BASELINE, TrainConfig(epochs=15, sampling="resample300"), seeds=(0, 1, 2, 3, 4)),
    Experiment("augment3000", "baseline CNN, minority classes augmented up to 3,000 each",
               BASELINE, TrainConfig(epochs=6, sampling="augment3000")),
    Experiment("weights", "baseline CNN, balanced class weights on the imbalanced data",
               BASELINE, TrainConfig(epochs=10, class_weights="balanced")),
    Experiment("weights_augment3000", "baseline CNN, balanced class weights after augmentation",
               BASELINE, TrainConfig(epochs=6, sampling="augment3000", class_weights="balanced")),
    Experiment("final", "the study's final CNN (3 conv+pool stages, dropout), balanced weights",
               FINAL, TrainConfig(epochs=FINAL_EPOCHS, class_weights="balanced")),
    Experiment("knn", "k-nearest neighbours on 35x35 block means, standardised, PCA 64",
               knn_ks=KNN_KS),
    Experiment("soft_f1", "final CNN trained on a differentiable macro soft-F1 loss alone",
               FINAL, TrainConfig(epochs=FINAL_EPOCHS, loss="soft_f1")),
    Experiment("soft_f1_ce", "final CNN trained on cross-entropy plus macro soft-F1",
               FINAL, TrainConfig(epochs=FINAL_EPOCHS, loss="ce+soft_f1", soft_f1_weight=1.0)),
]}

SMOKE_PER_CLASS = 12


def for_profile(experiment: Experiment, profile: str) -> Experiment:
    """The smoke profile: a small stratified subset, one epoch, at most two seeds."""
    if profile == "full":
        return experiment
    if profile != "smoke":
        raise ValueError(f"unknown profile {profile!r}")
    train = experiment.train and replace(experiment.train, epochs=1)
    return replace(experiment, train=train, seeds=experiment.seeds[:2],
                   knn_ks=tuple(k for k in experiment.knn_ks if k <= 11) or experiment.knn_ks)
