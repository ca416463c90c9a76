"""MobileNetV1 (Howard et al. 2017) as used by MGD for ImageNet (student of ResNet-50).

Layout and module names follow MGD's classification backbone (``yzd-v/MGD``
``cls/mmcls/models/backbones/mobilenet_v1.py``): one ``nn.Sequential`` called ``model`` of 14
blocks, ``model.0`` a 3x3/2 conv-BN-ReLU, ``model.1``..``model.13`` depthwise-separable blocks
(3x3 depthwise conv-BN-ReLU, 1x1 pointwise conv-BN-ReLU); then global average pooling and ``fc``.
An MGD/mmcls checkpoint maps onto it by dropping the ``backbone.`` prefix and renaming
``head.fc`` to ``fc``.

Stages (feature names are the module names of the last block at each resolution):

    name        channels (width 1.0)   reduction   at 224 px
    model.1      64                     2           112 x 112
    model.3     128                     4            56 x 56
    model.5     256                     8            28 x 28
    model.11    512                    16            14 x 14
    model.13   1024                    32             7 x 7     <- MGD distils this one
"""
from __future__ import annotations

import torch
from torch import nn

# (output channels, stride) of model.1 .. model.13 at width 1.0
_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
           (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias) -> BN -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 conv -> BN -> ReLU -> pointwise 1x1 conv -> BN -> ReLU (no biases)."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """MobileNetV1 with feature stages, see the module docstring for names and shapes.

    ``model(x)`` -> logits ``[N, num_classes]``; ``model(x, features=True)`` -> ``(logits, feats)``
    with feats ``{"model.1": ..., "model.13": ...}``. ``width_mult`` scales every width
    (1.0 is MGD's model: last stage 1024 channels).

    Init as MGD's config: Kaiming-normal (fan_out, relu) convs, BN weight 1 / bias 0, fc normal(0, 0.01).
    """

    def __init__(self, num_classes: int = 1000, *, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        widths = [max(8, int(c * width_mult)) for c, _ in _BLOCKS]
        stem = max(8, int(32 * width_mult))
        blocks, cin = [conv_bn(in_channels, stem, 2)], stem
        for cout, (_, stride) in zip(widths, _BLOCKS):
            blocks.append(conv_dw(cin, cout, stride))
            cin = cout
        self.model = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

        self.feature_channels: dict[str, int] = {}
        self.feature_reductions: dict[str, int] = {}
        reduction = 2
        for i, (_, stride) in enumerate(_BLOCKS, start=1):
            reduction *= stride
            last_at_resolution = i == len(_BLOCKS) or _BLOCKS[i][1] != 1
            if last_at_resolution:
                self.feature_channels[f"model.{i}"] = widths[i - 1]
                self.feature_reductions[f"model.{i}"] = reduction
        self._stage_index = tuple(int(n.split(".")[1]) for n in self.feature_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.constant_(self.fc.bias, 0)

    def forward(self, x: torch.Tensor, features: bool = False):
        feats = {}
        for i, block in enumerate(self.model):
            x = block(x)
            if i in self._stage_index:
                feats[f"model.{i}"] = x
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return (logits, feats) if features else logits


def mobilenet_v1(num_classes: int = 1000, **kwargs) -> MobileNetV1:
    """MobileNetV1 width 1.0 (MGD's ImageNet student): last stage ``model.13``, 1024 channels, /32."""
    return MobileNetV1(num_classes, **kwargs)
