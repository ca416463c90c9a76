"""Semantic segmentation: dilated ResNet-V1c backbones (output stride 8) with PSP / DeepLabV3 heads.

The architecture is mmsegmentation's (``pspnet_r18-d8``, ``pspnet_r101-d8``, ``deeplabv3_r18-d8``,
the configs behind MGD's and CT's Cityscapes numbers), with torchvision-style module names so that
``fastkd convert mmseg`` maps a checkpoint onto it key by key:

    stem           3x3/2 conv 32 -> 3x3 conv 32 -> 3x3 conv 64 (BN + ReLU after each), then 3x3/2 max-pool
                   (``deep_stem=False``: torchvision's 7x7/2 conv 64 + BN + ReLU instead)
    layer1..4      strides 1, 2, 1, 1 and dilations 1, 1, 2, 4: stride 8 from layer2 on; the first block
                   of a dilated stage uses half the stage's dilation (mmseg's contract_dilation, the same
                   as torchvision's replace_stride_with_dilation). BasicBlocks dilate their first 3x3 conv
                   only (as mmseg); Bottlenecks their 3x3 conv.
    decode_head    PSPHead (pyramid pooling 1, 2, 3, 6 -> 3x3 bottleneck) or ASPPHead (image pooling +
                   1x1 + 3x3 at dilations 12/24/36 -> 3x3 bottleneck), Dropout2d(0.1), 1x1 ``conv_seg``
    auxiliary_head FCNHead on layer3: 3x3 conv + BN + ReLU, Dropout2d(0.1), 1x1 ``conv_seg`` (trained with
                   weight 0.4, not used at inference)

Calling convention (the model contract of ``fastkd.models`` with dense logits):

- ``model(x)`` -> logits ``[N, K, H, W]`` at the input's resolution (bilinear, align_corners=False);
- ``model(x, features=True)`` -> ``(logits, feats)`` with the decode head's logits at stride 8
  (``[N, K, ceil(H/8), ceil(W/8)]``, what the task loss upsamples and the logit KD compares) and feats
  ``{"layer1": ..., "layer4": ..., "auxiliary_head": aux logits}`` (the last when the model has one);
- ``feature_channels`` / ``feature_reductions`` describe layer1..layer4 without a forward.

Example::
    model = pspnet_r18(num_classes=19)
    logits, feats = model(torch.randn(2, 3, 512, 512), features=True)   # logits [2, 19, 64, 64]
    feats["layer4"].shape                                              # [2, 512, 64, 64]
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...models.resnet import Bottleneck, conv3x3, init_resnet, make_stage

STRIDES = (1, 2, 1, 1)
DILATIONS = (1, 1, 2, 4)


class DilatedBasicBlock(nn.Module):
    """mmseg's BasicBlock: 3x3 (stride, dilation) -> 3x3 (padding 1, no dilation); torchvision's keys."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=nn.BatchNorm2d):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("DilatedBasicBlock supports only groups=1 and width_per_group=64")
        self.conv1 = conv3x3(inplanes, planes, stride, dilation=dilation)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1, stride: int = 1) -> nn.Sequential:
    """mmcv's ConvModule (conv without bias -> BN -> ReLU) as a Sequential: keys ``0.*`` and ``1.*``."""
    pad = 0 if kernel == 1 else dilation
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, align_corners=False (mmseg's Cityscapes configs)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PSPHead(nn.Module):
    """Pyramid pooling (Zhao et al., CVPR 2017): cat(x, up(conv(pool_s(x))) for s in scales) -> 3x3 -> cls."""

    def __init__(self, in_channels: int, channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(in_channels + len(pool_scales) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [resize(branch(x), x.shape[2:]) for branch in self.ppm]
        return self.conv_seg(self.dropout(self.bottleneck(torch.cat(outs, dim=1))))


def _torchvision_aspp():
    try:
        from torchvision.models.segmentation.deeplabv3 import ASPPConv, ASPPPooling
    except Exception as exc:  # a broken install fails with more than ImportError
        raise ImportError(f"the DeepLabV3 head uses torchvision's ASPP blocks, and torchvision cannot be "
                          f"imported here ({type(exc).__name__}: {exc})") from exc
    return ASPPConv, ASPPPooling


class ASPPHead(nn.Module):
    """DeepLabV3 (Chen et al. 2017) as mmseg's ASPPHead: cat(image pool, 1x1, 3x3 d12/24/36) -> 3x3 -> cls.

    The branches are torchvision's ``ASPPPooling`` / ``ASPPConv``; torchvision's ``ASPP`` module itself
    projects with a 1x1 conv and Dropout(0.5), mmseg (whose numbers the recipes reproduce) with a 3x3
    conv, so the head around the branches is mmseg's.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int,
                 dilations: Sequence[int] = (12, 24, 36), dropout: float = 0.1):
        super().__init__()
        ASPPConv, ASPPPooling = _torchvision_aspp()
        self.image_pool = ASPPPooling(in_channels, channels)
        self.aspp = nn.ModuleList([conv_bn_relu(in_channels, channels, 1)] +
                                  [ASPPConv(in_channels, channels, d) for d in dilations])
        self.bottleneck = conv_bn_relu((len(dilations) + 2) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.image_pool(x)] + [branch(x) for branch in self.aspp]
        return self.conv_seg(self.dropout(self.bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """mmseg's FCNHead with one conv (the auxiliary head): 3x3 conv-BN-ReLU, Dropout2d, 1x1 cls."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class SegmentationModel(nn.Module):
    """Dilated ResNet-V1c + decode head (+ auxiliary head on layer3); see the module docstring.

    ``base_channels`` (64) sets the stem width and the stage widths (x1, x2, x4, x8, as mmseg's ResNet);
    ``channels`` / ``aux_channels`` the decode / auxiliary head widths (``aux_channels=0``: no auxiliary
    head); ``head`` is ``psp`` or ``aspp``; ``deep_stem=False`` replaces the three 3x3 stem convs with
    torchvision's 7x7 one (ResNet-V1b), so that torchvision's ImageNet ResNets can initialise the backbone.
    """

    def __init__(self, block, layers: Sequence[int], head: str, num_classes: int, *, channels: int,
                 aux_channels: Optional[int] = 0, in_channels: int = 3, base_channels: int = 64,
                 dropout: float = 0.1, strides: Sequence[int] = STRIDES, dilations: Sequence[int] = DILATIONS,
                 deep_stem: bool = True):
        super().__init__()
        if len(layers) != 4 or len(strides) != 4 or len(dilations) != 4:
            raise ValueError(f"layers, strides and dilations need 4 entries each, got {list(layers)}, "
                             f"{list(strides)}, {list(dilations)}")
        stem_channels, half = base_channels, base_channels // 2
        self.deep_stem = bool(deep_stem)
        if self.deep_stem:  # ResNet-V1c: keys stem.{0,1,3,4,6,7}.*
            self.stem = nn.Sequential(*conv_bn_relu(in_channels, half, 3, stride=2), *conv_bn_relu(half, half, 3),
                                      *conv_bn_relu(half, stem_channels, 3))
        else:  # torchvision's / ResNet-V1b's 7x7/2 conv: keys stem.{0,1}.* (torchvision's conv1, bn1)
            self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_channels: Dict[str, int] = {}
        self.feature_reductions: Dict[str, int] = {}
        inplanes, reduction = stem_channels, 4
        widths = [base_channels * 2 ** i for i in range(4)]
        for i, (planes, n, s, d) in enumerate(zip(widths, layers, strides, dilations)):
            reduction *= s
            first = d // 2 if d > 1 else d  # mmseg contract_dilation
            setattr(self, f"layer{i + 1}", make_stage(block, inplanes, planes, n, stride=s, dilation=d,
                                                      first_dilation=first))
            inplanes = planes * block.expansion
            self.feature_channels[f"layer{i + 1}"] = inplanes
            self.feature_reductions[f"layer{i + 1}"] = reduction
        heads = {"psp": PSPHead, "aspp": ASPPHead}
        if head not in heads:
            raise ValueError(f"unknown decode head {head!r}: use one of {sorted(heads)}")
        self.decode_head = heads[head](inplanes, channels, num_classes, dropout=dropout)
        self.auxiliary_head = (FCNHead(self.feature_channels["layer3"], aux_channels, num_classes, dropout=dropout)
                               if aux_channels else None)
        self.num_classes = num_classes
        init_resnet(self, zero_init_residual=False)
        for h in (self.decode_head, self.auxiliary_head):
            if h is not None:  # mmseg's BaseDecodeHead init of the classifier
                nn.init.normal_(h.conv_seg.weight, 0.0, 0.01)
                nn.init.zeros_(h.conv_seg.bias)

    def forward(self, x: torch.Tensor, features: bool = False):
        size = x.shape[2:]
        x = self.maxpool(self.stem(x))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        logits = self.decode_head(f4)
        if not features:
            return resize(logits, size)
        feats = {"layer1": f1, "layer2": f2, "layer3": f3, "layer4": f4}
        if self.auxiliary_head is not None:
            feats["auxiliary_head"] = self.auxiliary_head(f3)
        return logits, feats


def _r18(head: str, num_classes: int, **kw) -> SegmentationModel:
    kw.setdefault("channels", 128)
    kw.setdefault("aux_channels", 64)
    return SegmentationModel(DilatedBasicBlock, [2, 2, 2, 2], head, num_classes, **kw)


def _r101(head: str, num_classes: int, **kw) -> SegmentationModel:
    kw.setdefault("channels", 512)
    kw.setdefault("aux_channels", 256)
    return SegmentationModel(Bottleneck, [3, 4, 23, 3], head, num_classes, **kw)


def _r50(head: str, num_classes: int, **kw) -> SegmentationModel:
    kw.setdefault("channels", 512)
    kw.setdefault("aux_channels", 256)
    return SegmentationModel(Bottleneck, [3, 4, 6, 3], head, num_classes, **kw)


def pspnet_r18(num_classes: int = 19, **kw) -> SegmentationModel:
    """PSPNet, ResNet-18-V1c D8 (mmseg ``pspnet_r18-d8``): head channels 128, aux 64, layer4 512 ch."""
    return _r18("psp", num_classes, **kw)


def pspnet_r50(num_classes: int = 19, **kw) -> SegmentationModel:
    """PSPNet, ResNet-50-V1c D8: head channels 512, aux 256, layer4 2048 ch."""
    return _r50("psp", num_classes, **kw)


def pspnet_r101(num_classes: int = 19, **kw) -> SegmentationModel:
    """PSPNet, ResNet-101-V1c D8 (mmseg ``pspnet_r101-d8``, the teacher): head 512, aux 256, layer4 2048 ch."""
    return _r101("psp", num_classes, **kw)


def deeplabv3_r18(num_classes: int = 19, **kw) -> SegmentationModel:
    """DeepLabV3, ResNet-18-V1c D8 (mmseg ``deeplabv3_r18-d8``): head channels 128, aux 64."""
    return _r18("aspp", num_classes, **kw)


def deeplabv3_r101(num_classes: int = 19, **kw) -> SegmentationModel:
    """DeepLabV3, ResNet-101-V1c D8 (mmseg ``deeplabv3_r101-d8``): head channels 512, aux 256."""
    return _r101("aspp", num_classes, **kw)


# the segmentation task's model names (``student.name`` / ``teacher.name``), beside fastkd.models' zoo
MODELS: Dict[str, Callable[..., SegmentationModel]] = {
    "pspnet_r18": pspnet_r18, "pspnet_r50": pspnet_r50, "pspnet_r101": pspnet_r101,
    "deeplabv3_r18": deeplabv3_r18, "deeplabv3_r101": deeplabv3_r101,
}
