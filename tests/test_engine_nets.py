"""Tiny teacher/student nets following the fastkd.models contract, for the engine tests.

``model(x)`` -> logits; ``model(x, features=True)`` -> (logits, {"layer1": [N,C,H,W], "layer2": ...}).
Referenced from configs as ``tests.test_engine_nets:tiny``.
"""
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                    nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)
        self.feature_channels = {"layer1": width, "layer2": 2 * width}
        self.feature_reductions = {"layer1": 1, "layer2": 2}

    def forward(self, x, features: bool = False):
        f1 = self.layer1(self.stem(x))
        f2 = self.layer2(f1)
        logits = self.fc(f2.mean(dim=(2, 3)))
        return (logits, {"layer1": f1, "layer2": f2}) if features else logits


def tiny(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> TinyNet:
    return TinyNet(num_classes, in_channels, width)


def test_tiny_net_contract():
    net = tiny(num_classes=5, width=4)
    logits, feats = net(torch.randn(2, 3, 8, 8), features=True)
    assert logits.shape == (2, 5)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"layer1": (2, 4, 8, 8), "layer2": (2, 8, 4, 4)}
