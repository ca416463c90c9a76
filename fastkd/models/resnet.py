"""ImageNet ResNets (He et al., CVPR 2016) with torchvision's module names, keys and init.

``resnet18/34/50/101/152``, ``resnext50_32x4d`` and ``wide_resnet50_2`` here have exactly the
``state_dict`` keys and shapes of ``torchvision.models.<name>()`` (conv1, bn1, layer1.0.conv1, ...,
layer1.0.downsample.0/1, fc), so a torchvision checkpoint loads with ``strict=True`` and an exported
student loads back into torchvision. Bottlenecks put the stride on the 3x3 conv (ResNet v1.5), as
torchvision does. torchvision itself is never imported.

Stages (feature names): ``layer1``..``layer4``, channels 64/128/256/512 x expansion (1 for
BasicBlock, 4 for Bottleneck), reductions 4/8/16/32 (a stage replaced by dilation keeps the
previous reduction).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Type, Union

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding = dilation, no bias (torchvision's helper)."""
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and an identity (or 1x1 projection) shortcut; expansion 1."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock supports only groups=1 and width_per_group=64, "
                             f"got groups={groups}, width_per_group={base_width}")
        if dilation > 1:
            raise ValueError("BasicBlock does not support dilation > 1 (as in torchvision); "
                             "use a Bottleneck ResNet for replace_stride_with_dilation")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride, groups, dilation) -> 1x1 expand (x4), BN after each; v1.5 stride."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]


def make_stage(block: Block, inplanes: int, planes: int, blocks: int, *, stride: int = 1,
               dilation: int = 1, first_dilation: int = 1, groups: int = 1, base_width: int = 64,
               norm_layer: NormLayer = nn.BatchNorm2d) -> nn.Sequential:
    """``blocks`` residual blocks; the first strides (and projects with 1x1 conv + norm if needed).

    Module names inside are torchvision's: ``0.conv1``, ..., ``0.downsample.0`` / ``.1``.
    """
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                   norm_layer(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample, groups, base_width, first_dilation,
                    norm_layer)]
    inplanes = planes * block.expansion
    for _ in range(1, blocks):
        layers.append(block(inplanes, planes, groups=groups, base_width=base_width,
                            dilation=dilation, norm_layer=norm_layer))
    return nn.Sequential(*layers)


def init_resnet(model: nn.Module, zero_init_residual: bool) -> None:
    """torchvision's init: Kaiming-normal (fan_out, relu) convs, norm weight 1 / bias 0; with
    ``zero_init_residual`` the last norm of every residual branch starts at 0 (Goyal et al. 2017).
    Linear layers keep PyTorch's default init, as in torchvision."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in model.modules():
            last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
            if last is not None and getattr(last, "weight", None) is not None:
                nn.init.constant_(last.weight, 0)


class ResNet(nn.Module):
    """ImageNet ResNet: 7x7/2 stem + 3x3/2 max-pool, four stages, global average pool, fc.

    ``model(x)`` -> logits ``[N, num_classes]``; ``model(x, features=True)`` -> ``(logits,
    {"layer1": ..., "layer4": ...})`` with each stage output ``[N, C, H, W]`` (no hooks).
    ``feature_channels`` / ``feature_reductions`` describe the stages without a forward.

    Example::
        model = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=1000)   # == torchvision resnet50 keys
        logits, feats = model(torch.randn(2, 3, 224, 224), features=True)   # feats["layer4"]: [2, 2048, 7, 7]
    """

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000, *,
                 in_channels: int = 3, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[Sequence[bool]] = None,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        dilate = list(replace_stride_with_dilation or [False, False, False])
        if len(layers) != 4 or len(dilate) != 3:
            raise ValueError(f"layers needs 4 entries and replace_stride_with_dilation 3, "
                             f"got {list(layers)} and {dilate}")
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.feature_channels: dict[str, int] = {}
        self.feature_reductions: dict[str, int] = {}
        inplanes, dilation, reduction = 64, 1, 4
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride, first_dilation = (1 if i == 0 else 2), dilation
            if i > 0 and dilate[i - 1]:
                dilation, stride = dilation * stride, 1
            reduction *= stride
            name = f"layer{i + 1}"
            setattr(self, name, make_stage(block, inplanes, planes, n, stride=stride,
                                           dilation=dilation, first_dilation=first_dilation,
                                           groups=groups, base_width=width_per_group,
                                           norm_layer=norm_layer))
            inplanes = planes * block.expansion
            self.feature_channels[name] = inplanes
            self.feature_reductions[name] = reduction
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        init_resnet(self, zero_init_residual)

    def forward(self, x: torch.Tensor, features: bool = False):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        logits = self.fc(torch.flatten(self.avgpool(f4), 1))
        if not features:
            return logits
        return logits, {"layer1": f1, "layer2": f2, "layer3": f3, "layer4": f4}


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-18: BasicBlock [2, 2, 2, 2]; stages 64/128/256/512 channels."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-34: BasicBlock [3, 4, 6, 3]; stages 64/128/256/512 channels."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50: Bottleneck [3, 4, 6, 3]; stages 256/512/1024/2048 channels."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kwargs)


def resnet101(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-101: Bottleneck [3, 4, 23, 3]; stages 256/512/1024/2048 channels."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, **kwargs)


def resnet152(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-152: Bottleneck [3, 8, 36, 3]; stages 256/512/1024/2048 channels."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, **kwargs)


def resnext50_32x4d(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNeXt-50 32x4d: Bottleneck [3, 4, 6, 3], groups 32, width per group 4."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, groups=32, width_per_group=4, **kwargs)


def wide_resnet50_2(num_classes: int = 1000, **kwargs) -> ResNet:
    """Wide ResNet-50-2: Bottleneck [3, 4, 6, 3] with twice the inner width."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width_per_group=128, **kwargs)
