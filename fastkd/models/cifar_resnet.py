"""CIFAR-style ResNets (He et al. 2016, section 4.2) as used across the distillation literature.

The layout and names of the widely used ``resnet8x4`` / ``resnet32x4`` / ``resnet56`` students and
teachers (CRD, RepDistiller): a 3x3 stem conv without pooling, three stages of BasicBlocks with
n = (depth - 2) / 6 blocks each (strides 1, 2, 2), global average pooling, fc. Module names are
torchvision-like (conv1, bn1, layer1.0.conv1, ..., layer2.0.downsample.0/1, fc).

Stages (feature names): ``layer1``, ``layer2``, ``layer3``, reductions 1 / 2 / 4 (a 32x32 image gives
32x32, 16x16, 8x8; a 28x28 one 28, 14, 7). Channels: widths[1:] (e.g. 64/128/256 for the x4 nets).

    name         depth  widths (stem, layer1, layer2, layer3)
    resnet8        8    16, 16, 32, 64
    resnet14      14    16, 16, 32, 64
    resnet20      20    16, 16, 32, 64
    resnet32      32    16, 16, 32, 64
    resnet44      44    16, 16, 32, 64
    resnet56      56    16, 16, 32, 64
    resnet110    110    16, 16, 32, 64
    resnet8x4      8    32, 64, 128, 256
    resnet32x4    32    32, 64, 128, 256
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .resnet import BasicBlock, init_resnet, make_stage


class CifarResNet(nn.Module):
    """CIFAR ResNet of ``depth`` = 6n + 2 layers with stage widths ``widths`` (stem first).

    ``model(x)`` -> logits; ``model(x, features=True)`` -> ``(logits, {"layer1", "layer2", "layer3"})``.
    Works at any input size (adaptive average pooling), e.g. 32x32 CIFAR or 28x28 Fashion-MNIST with
    ``in_channels=1``. Init: Kaiming-normal (fan_out) convs, norm weight 1 / bias 0.

    Example::
        student = CifarResNet(8, (32, 64, 128, 256), num_classes=100)   # resnet8x4
    """

    def __init__(self, depth: int, widths: Sequence[int] = (16, 16, 32, 64), num_classes: int = 10,
                 *, in_channels: int = 3, zero_init_residual: bool = False):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths needs 4 entries (stem, layer1, layer2, layer3), got {list(widths)}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_stage(BasicBlock, widths[0], widths[1], n, stride=1)
        self.layer2 = make_stage(BasicBlock, widths[1], widths[2], n, stride=2)
        self.layer3 = make_stage(BasicBlock, widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_channels = {"layer1": widths[1], "layer2": widths[2], "layer3": widths[3]}
        self.feature_reductions = {"layer1": 1, "layer2": 2, "layer3": 4}
        init_resnet(self, zero_init_residual)

    def forward(self, x: torch.Tensor, features: bool = False):
        x = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        logits = self.fc(torch.flatten(self.avgpool(f3), 1))
        if not features:
            return logits
        return logits, {"layer1": f1, "layer2": f2, "layer3": f3}


_THIN, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)


def _factory(depth: int, widths: Sequence[int], name: str):
    def build(num_classes: int = 10, **kwargs) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes, **kwargs)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"CIFAR ResNet-{depth}, widths {tuple(widths)}; stages layer1..layer3 "
                     f"({widths[1]}/{widths[2]}/{widths[3]} channels, reductions 1/2/4).")
    return build


resnet8 = _factory(8, _THIN, "resnet8")
resnet14 = _factory(14, _THIN, "resnet14")
resnet20 = _factory(20, _THIN, "resnet20")
resnet32 = _factory(32, _THIN, "resnet32")
resnet44 = _factory(44, _THIN, "resnet44")
resnet56 = _factory(56, _THIN, "resnet56")
resnet110 = _factory(110, _THIN, "resnet110")
resnet8x4 = _factory(8, _X4, "resnet8x4")
resnet32x4 = _factory(32, _X4, "resnet32x4")
