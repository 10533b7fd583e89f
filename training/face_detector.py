"""The face detector's networks: MTCNN, exported to ONNX for the service.

The weights are the ``pnet.pt``, ``rnet.pt`` and ``onet.pt`` state dicts that
``facenet-pytorch`` (MIT licence, Tim Esler; the networks are Zhang et al. 2016's MTCNN,
converted from the authors' Caffe models) ships inside its wheel. The package itself pins
old torch versions, so only its wheel is downloaded (``pip download --no-deps``), checked
against its SHA-256, and the three state dicts loaded into the definitions below, which
follow ``facenet_pytorch/models/mtcnn.py``.

What the export changes, so that the service needs nothing but ONNX Runtime and NumPy:
- the input is one grayscale channel of raw pixel values in [0, 255]. MTCNN takes RGB; a
  gray image is three equal channels, so the first convolution's weights are summed over
  its input channels, which gives the same output for gray images. The normalisation
  ``(x - 127.5) / 128`` is part of the graph.
- the outputs are the face probability and the box offsets (ONet's landmarks are dropped).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn

from service.faces import STAGES
from service.onnx_runtime import ONNX_OPSET
from training.fetch import pinned_wheel

FACENET_VERSION = "2.6.0"
FACENET_WHEEL = f"facenet_pytorch-{FACENET_VERSION}-py3-none-any.whl"
FACENET_WHEEL_SHA256 = "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca"


class PNet(nn.Module):
    """Proposal network: fully convolutional, a 12x12 window every 2 pixels."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """Refinement network on 24x24 crops."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The Caffe weights flatten in (width, height, channel) order.
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """Output network on 48x48 crops (its landmark head is not exported)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)))
        return self.dense6_2(x), torch.softmax(self.dense6_1(x), dim=1)


NETWORKS = {"pnet": PNet, "rnet": RNet, "onet": ONet}


class GrayInput(nn.Module):
    """One gray channel of raw pixels in; (offsets, face probability) out."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        rgb = net.conv1
        self.net.conv1 = nn.Conv2d(1, rgb.out_channels, rgb.kernel_size)
        with torch.no_grad():
            self.net.conv1.weight.copy_(rgb.weight.sum(dim=1, keepdim=True))
            self.net.conv1.bias.copy_(rgb.bias)

    def forward(self, pixels: torch.Tensor):
        offsets, probabilities = self.net((pixels - 127.5) * 0.0078125)
        return offsets, probabilities[:, 1]


def facenet_wheel(cache_dir: Path) -> Path:
    """facenet-pytorch's wheel, downloaded once into ``cache_dir`` and verified."""
    return pinned_wheel(f"facenet-pytorch=={FACENET_VERSION}", FACENET_WHEEL,
                        FACENET_WHEEL_SHA256, cache_dir)


def load_networks(cache_dir: Path) -> dict[str, nn.Module]:
    """The three MTCNN networks with their pretrained weights, RGB input, in eval mode."""
    nets = {}
    with zipfile.ZipFile(facenet_wheel(cache_dir)) as archive:
        for stage in STAGES:
            with archive.open(f"facenet_pytorch/data/{stage}.pt") as file:
                state = torch.load(file, map_location="cpu", weights_only=True)
            net = NETWORKS[stage]()
            net.load_state_dict(state)
            nets[stage] = net.eval()
    return nets


def export_networks(cache_dir: Path, out_dir: Path) -> dict[str, Path]:
    """``face_{pnet,rnet,onet}.onnx`` in ``out_dir``: gray pixels in, NCHW, batch dynamic."""
    import onnx

    paths = {}
    for stage, net in load_networks(cache_dir).items():
        wrapped = GrayInput(net).eval()
        side = {"pnet": 48, "rnet": 24, "onet": 48}[stage]
        axes = {"pixels": {0: "batch"}, "offsets": {0: "batch"}, "face_probability": {0: "batch"}}
        if stage == "pnet":  # any image size; the others take fixed-size crops
            axes = {"pixels": {0: "batch", 2: "height", 3: "width"},
                    "offsets": {0: "batch", 2: "rows", 3: "cols"},
                    "face_probability": {0: "batch", 1: "rows", 2: "cols"}}
        path = out_dir / f"face_{stage}.onnx"
        torch.onnx.export(wrapped, (torch.zeros(1, 1, side, side),), str(path),
                          input_names=["pixels"], output_names=["offsets", "face_probability"],
                          dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
        onnx.checker.check_model(onnx.load(str(path)))
        paths[stage] = path
    return paths
