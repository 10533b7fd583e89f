"""The networks, each built from a :class:`ModelConfig` (stored in every checkpoint).

Every network takes the service's contract, float32 ``[N, 1, 350, 350]`` in [0, 1], and
reduces resolution first with a fixed average pool (the *stem*), so convolutions run at
:attr:`ModelConfig.resolution` pixels (88 by default): a step at 350x350 costs 40 times
one at 64x64 on a 2-core CPU. ``fer_xception`` resizes the pooled image once more, to the
64x64 its FER2013 weights were trained at, so its convolutions run at 64 px whatever the pool.
Because the stem has no parameters, training feeds the pooled images straight to the
*body*; the exported model is stem + body + softmax, which computes the same thing.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from service.classes import NUM_CLASSES
from service.preprocessing import INPUT_SIZE


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "final"          # baseline | final | resnet | fer_xception
    pool: int = 4                # stem: average pool with this kernel and stride ...
    pad: int = 1                 # ... after this much zero padding (not averaged in)
    channels: tuple[int, ...] = (32, 64, 128)
    hidden: int = 128            # final: width of the dense layer
    stem_stride: int = 1         # resnet: stride of its first convolution
    dropout: float = 0.5
    num_classes: int = NUM_CLASSES
    pretrained: str = ""         # fer_xception: "fer" starts from FER2013 weights

    def __post_init__(self):
        # Windows must tile the padded input exactly, so a horizontal flip of the input is a
        # flip of the pooled image (test-time flip then works on pooled and full images alike).
        if (INPUT_SIZE + 2 * self.pad) % self.pool:
            raise ValueError(f"pool {self.pool} with pad {self.pad} does not tile {INPUT_SIZE}")

    @property
    def resolution(self) -> int:
        return (INPUT_SIZE + 2 * self.pad) // self.pool

    def to_dict(self) -> dict:
        return {**asdict(self), "resolution": self.resolution}

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """The config a checkpoint or manifest stored (derived keys such as ``resolution``
        are ignored)."""
        known = {f.name for f in fields(cls)}
        config = {k: v for k, v in values.items() if k in known}
        if "channels" in config:
            config["channels"] = tuple(config["channels"])
        return cls(**config)


def build_body(config: ModelConfig) -> nn.Module:
    size = config.resolution
    if config.arch == "baseline":
        # The study's first model: one conv, ReLU, one pool, one linear layer.
        width = config.channels[0]
        return nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(width * (size // 2) ** 2, config.num_classes))
    if config.arch == "final":
        # The study's final model: three conv + pool stages, then dense layers with dropout.
        layers, in_ch = [], 1
        for width in config.channels:
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            in_ch, size = width, size // 2
        return nn.Sequential(
            *layers, nn.Flatten(), nn.Dropout(config.dropout),
            nn.Linear(in_ch * size * size, config.hidden), nn.ReLU(),
            nn.Dropout(config.dropout), nn.Linear(config.hidden, config.num_classes))
    if config.arch == "resnet":
        return ResNet(config)
    if config.arch == "fer_xception":
        from training.fer_backbone import MiniXception

        return MiniXception(config.num_classes, config.dropout, widths=config.channels)
    raise ValueError(f"unknown arch {config.arch!r}")


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity() if stride == 1 and in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small residual network with batch norm: one block per stage, stride 2 between."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        widths = config.channels
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, config.stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(in_ch, width, 1 if i == 0 else 2))
            in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(config.dropout), nn.Linear(in_ch, config.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def make_stem(config: ModelConfig) -> nn.AvgPool2d:
    return nn.AvgPool2d(config.pool, config.pool, config.pad, count_include_pad=False)


class EmotionNet(nn.Module):
    """The whole model: fixed stem, trainable body; ``forward`` gives logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.stem = make_stem(config)
        self.body = build_body(config)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(image))


class WithSoftmax(nn.Module):
    """What gets exported: the contract in, class probabilities out (optionally TTA flip)."""

    def __init__(self, model: EmotionNet, flip: bool = False, bias: torch.Tensor | None = None,
                 temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.flip = flip
        if bias is None:
            bias = torch.zeros(model.config.num_classes)
        self.register_buffer("bias", bias.float())
        self.temperature = float(temperature)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.model(image)
        if self.flip:
            logits = (logits + self.model(torch.flip(image, dims=[3]))) / 2
        # Offsets act on log-probabilities; the logits differ from those by a per-image
        # constant, which neither the offsets' argmax nor the softmax sees.
        scores = logits + self.bias
        if self.temperature != 1.0:
            scores = scores / self.temperature
        return torch.softmax(scores, dim=1)


def save_checkpoint(path: Path, model: EmotionNet, **extra) -> dict:
    """Weights with the config that rebuilds the network, plus whatever the run records.
    Written beside and moved into place: a run stopped while saving leaves the previous file
    or none, never a cut one that a later stage would read."""
    checkpoint = {"model_config": model.config.to_dict(), "state_dict": model.state_dict(),
                  **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return checkpoint


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, or a one-line :class:`~training.fetch.DataError` naming a file that is
    cut short or not one (torch's own errors name no file, or were a traceback)."""
    from training.fetch import DataError

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001  torch raises a zoo: RuntimeError, EOFError, ...
        if "allocate memory" in str(exc):  # torch's allocator: the machine's, not the file's
            raise
        raise DataError(f"{path} is not a readable checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); run "
                        "the stage that writes it again") from None
    if not isinstance(checkpoint, dict) or not {"model_config", "state_dict"} <= set(checkpoint):
        raise DataError(f"{path} is not a checkpoint of this project (no model_config and "
                        "state_dict); run the stage that writes it again")
    return checkpoint


def model_from_checkpoint(checkpoint: dict) -> EmotionNet:
    model = EmotionNet(ModelConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
