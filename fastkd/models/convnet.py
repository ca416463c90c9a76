"""Small plain ConvNets for 28x28 / 32x32 inputs: a teacher that trains on Fashion-MNIST in minutes
on a 2-core CPU, and students a fraction of its size.

Each of the three stages is conv3x3/2-BN-ReLU then conv3x3-BN-ReLU, so the stages sit at reductions
2 / 4 / 8 (28x28 -> 14, 7, 4; 32x32 -> 16, 8, 4); then global average pooling and ``fc``.

Stages (feature names): ``stage1``, ``stage2``, ``stage3``.

    name            widths (stage1, stage2, stage3)   params (10 classes, 1 channel)
    convnet_tiny     8, 16, 32                        ~ 18 k
    convnet_small   16, 32, 64                        ~ 73 k
    convnet_base    32, 64, 128                       ~ 0.29 M
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 conv (padding 1, no bias) -> BN -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ConvNet(nn.Module):
    """Three-stage plain ConvNet; see the module docstring.

    ``model(x)`` -> logits; ``model(x, features=True)`` -> ``(logits, {"stage1", "stage2", "stage3"})``.

    Example::
        teacher = ConvNet((32, 64, 128), num_classes=10, in_channels=1)   # Fashion-MNIST
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128), num_classes: int = 10, *,
                 in_channels: int = 3):
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths needs 3 positive entries, got {list(widths)}")
        cin = in_channels
        self.feature_channels: dict[str, int] = {}
        self.feature_reductions: dict[str, int] = {}
        for i, width in enumerate(widths, start=1):
            setattr(self, f"stage{i}", nn.Sequential(conv_bn_relu(cin, width, 2),
                                                     conv_bn_relu(width, width, 1)))
            self.feature_channels[f"stage{i}"] = width
            self.feature_reductions[f"stage{i}"] = 2 ** i
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, features: bool = False):
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        logits = self.fc(torch.flatten(self.avgpool(f3), 1))
        if not features:
            return logits
        return logits, {"stage1": f1, "stage2": f2, "stage3": f3}


def convnet_tiny(num_classes: int = 10, **kwargs) -> ConvNet:
    """ConvNet with widths 8/16/32 (a tiny student)."""
    return ConvNet((8, 16, 32), num_classes, **kwargs)


def convnet_small(num_classes: int = 10, **kwargs) -> ConvNet:
    """ConvNet with widths 16/32/64 (a small student)."""
    return ConvNet((16, 32, 64), num_classes, **kwargs)


def convnet_base(num_classes: int = 10, **kwargs) -> ConvNet:
    """ConvNet with widths 32/64/128 (the Fashion-MNIST teacher)."""
    return ConvNet((32, 64, 128), num_classes, **kwargs)
