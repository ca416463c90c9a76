"""torchvision's RetinaNet and Faster R-CNN with ResNet / ResNeXt FPN backbones, built by name.

Names: ``{retinanet|fasterrcnn}_{backbone}_fpn[_v2]`` where backbone is ``resnet18/34/50/101/152``,
``resnext{50,101,152}_{G}x{W}d`` (e.g. ``resnext101_64x4d``, ``resnext101_32x4d``) or
``wide_resnet{50,101}_2``. The modules are torchvision's own (``RetinaNet``, ``FasterRCNN``,
``BackboneWithFPN``, its heads), assembled as torchvision's ``*_resnet50_fpn[_v2]`` factories assemble
them, so ``retinanet_resnet50_fpn`` loads torchvision's ``RetinaNet_ResNet50_FPN_Weights.COCO_V1``
state dict as it is (and likewise for the three other R50 variants).

What fastkd adds for distillation (all options of :func:`build_detector`):

- ``trainable_backbone_layers`` (torchvision's meaning: 3 trains layer2..layer4, i.e. mmdetection's
  ``frozen_stages=1``) and ``frozen_bn`` (FrozenBatchNorm2d in the backbone; default as torchvision:
  on for v1, off for v2) with ``frozen_bn_eps`` (torchvision's v1 COCO checkpoints were evaluated with 0);
- ``p6_from`` / ``p7_relu`` for RetinaNet's extra levels (torchvision v1: P6 from P5, v2 and
  mmdetection: from C5; mmdetection has no ReLU before the P7 conv), ``dcn_stages`` for deformable
  convolutions in the bottlenecks' 3x3 convs (mmdetection's ``dcn`` + ``stage_with_dcn``);
- ``anchor_sizes`` (smallest anchor per level), ``fpn_channels``, ``min_size`` / ``max_size`` for small
  images (tests, the Fashion-MNIST scenes);
- ``features_only=True``: a :class:`DetectorFeatures` (backbone + FPN only) for teachers.

This module imports torchvision; the detection task imports it when it builds a model.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Optional, Sequence

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FasterRCNN, RPNHead
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops import FrozenBatchNorm2d, deform_conv2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

_NAME = re.compile(r"^(?P<arch>retinanet|fasterrcnn)_(?P<backbone>resnet\d+|resnext\d+_\d+x\d+d|wide_resnet\d+_2)"
                   r"_fpn(?P<v2>_v2)?$")
_DEPTHS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
           101: ("bottleneck", [3, 4, 23, 3]), 152: ("bottleneck", [3, 8, 36, 3])}
EXAMPLES = ["retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "retinanet_resnext101_64x4d_fpn",
            "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_resnext101_32x4d_fpn"]


def parse_backbone(name: str) -> tuple[str, list[int], int, int]:
    """``resnext101_32x4d`` -> ("bottleneck", [3, 4, 23, 3], groups 32, width per group 4)."""
    m = re.fullmatch(r"(resnet|resnext|wide_resnet)(\d+)(?:_(\d+)x(\d+)d|_2)?", name)
    if m is None or int(m.group(2)) not in _DEPTHS:
        raise ValueError(f"unknown detection backbone {name!r}: use resnet18/34/50/101/152, "
                         "resnext<depth>_<G>x<W>d or wide_resnet50_2/wide_resnet101_2")
    kind, layers = _DEPTHS[int(m.group(2))]
    groups, width = 1, 64
    if m.group(1) == "resnext":
        if m.group(3) is None:
            raise ValueError(f"backbone {name!r}: a ResNeXt needs <G>x<W>d, e.g. resnext101_64x4d")
        groups, width = int(m.group(3)), int(m.group(4))
    elif m.group(1) == "wide_resnet":
        width = 128
    if kind == "basic" and (groups, width) != (1, 64):
        raise ValueError(f"backbone {name!r}: depths 18 and 34 have no grouped or wide variant")
    return kind, layers, groups, width


class DeformConv(nn.Module):
    """A 3x3 convolution with deformable sampling (DCN v1) or modulated deformable sampling (DCN v2),
    through ``torchvision.ops.deform_conv2d``; offsets (and masks) from ``conv_offset``.

        out = conv_offset(x)                              [N, (2 or 3) * dg * kh * kw, H', W']
        v2: offset = cat(out[:, :2K]), mask = sigmoid(out[:, 2K:])   (K = dg * kh * kw); v1: offset = out
        y = deform_conv2d(x, offset, weight, stride, padding, dilation, mask)

    Keys ``weight``, ``conv_offset.weight``, ``conv_offset.bias`` (mmdetection's DeformConv2dPack /
    ModulatedDeformConv2dPack layout). The offsets start at zero, so a fresh module is the plain conv.
    """

    def __init__(self, conv: nn.Conv2d, *, modulated: bool = True, deform_groups: int = 1):
        super().__init__()
        if conv.bias is not None:
            raise ValueError("DeformConv replaces bias-free convolutions (ResNet's conv2)")
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=conv.weight.requires_grad)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.modulated, self.deform_groups = modulated, deform_groups
        kh, kw = conv.kernel_size
        per_point = 3 if modulated else 2
        self.conv_offset = nn.Conv2d(conv.in_channels, per_point * deform_groups * kh * kw, conv.kernel_size,
                                     stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_offset(x)
        mask = None
        if self.modulated:
            k2 = out.shape[1] // 3 * 2
            out, mask = out[:, :k2], out[:, k2:].sigmoid()
        return deform_conv2d(x, out, self.weight, None, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, mask=mask)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, stride={self.stride}, modulated={self.modulated}, " \
               f"deform_groups={self.deform_groups}"


class P6P7(ExtraFPNBlock):
    """RetinaNet's P6 (3x3 stride-2 conv of C5, or of P5 when ``in_channels == out_channels``) and P7
    (3x3 stride-2 conv of P6, after a ReLU when ``relu``), keys ``p6.*`` / ``p7.*`` as torchvision's
    ``LastLevelP6P7`` (which always has the ReLU; mmdetection's RetinaNet FPN has none)."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)
        self.use_p5, self.relu = in_channels == out_channels, relu

    def forward(self, p: list, c: list, names: list) -> tuple[list, list]:
        p6 = self.p6(p[-1] if self.use_p5 else c[-1])
        p7 = self.p7(torch.relu(p6) if self.relu else p6)
        return p + [p6, p7], names + ["p6", "p7"]


def build_resnet(backbone: str, *, frozen_bn: bool, frozen_bn_eps: float = 1e-5, dcn_stages: Sequence[int] = (),
                 dcn_modulated: bool = True):
    """torchvision's ResNet / ResNeXt body (keys as torchvision's), DCN in the 3x3 convs of ``dcn_stages``."""
    kind, layers, groups, width = parse_backbone(backbone)
    block = tv_resnet.BasicBlock if kind == "basic" else tv_resnet.Bottleneck
    norm = partial(FrozenBatchNorm2d, eps=frozen_bn_eps) if frozen_bn else nn.BatchNorm2d
    body = tv_resnet.ResNet(block, layers, groups=groups, width_per_group=width, norm_layer=norm)
    for stage in dcn_stages:
        if stage not in (1, 2, 3, 4) or kind == "basic":
            raise ValueError(f"dcn_stages: {stage} is not a bottleneck stage 1..4 of {backbone}")
        for blk in getattr(body, f"layer{stage}"):
            blk.conv2 = DeformConv(blk.conv2, modulated=dcn_modulated)
    return body


def freeze_stages(body: nn.Module, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` of (conv1+bn1, layer1, ..., layer4), as torchvision's
    ``trainable_backbone_layers`` (5: everything trains; 3: layer2..layer4 train)."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in 0..5, got {trainable_layers}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, p in body.named_parameters():
        if not any(name.startswith(t) for t in train):
            p.requires_grad_(False)


def build_backbone_fpn(backbone: str, arch: str, *, v2: bool, frozen_bn: bool, frozen_bn_eps: float,
                       trainable_backbone_layers: int, fpn_channels: int, p6_from: Optional[str], p7_relu: bool,
                       dcn_stages: Sequence[int], dcn_modulated: bool):
    """torchvision's ``BackboneWithFPN``: C3-C5 + P6/P7 for RetinaNet, C2-C5 + max-pool P6 for Faster R-CNN."""
    body = build_resnet(backbone, frozen_bn=frozen_bn, frozen_bn_eps=frozen_bn_eps, dcn_stages=dcn_stages,
                        dcn_modulated=dcn_modulated)
    freeze_stages(body, trainable_backbone_layers)
    c2 = body.inplanes // 8  # torchvision's in_channels_stage2
    returned = [2, 3, 4] if arch == "retinanet" else [1, 2, 3, 4]
    in_channels = [c2 * 2 ** (i - 1) for i in returned]
    fpn_norm = nn.BatchNorm2d if (v2 and arch == "fasterrcnn") else None
    if arch == "retinanet":
        p6_from = p6_from or ("c5" if v2 else "p5")
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from must be 'c5' or 'p5', got {p6_from!r}")
        if p6_from == "c5" and in_channels[-1] == fpn_channels:
            raise ValueError(f"p6_from 'c5' needs C5 channels ({in_channels[-1]}) != fpn_channels")
        source = in_channels[-1] if p6_from == "c5" else fpn_channels
        # torchvision's own block where it fits, so that its checkpoints meet the very same module
        extra = LastLevelP6P7(source, fpn_channels) if p7_relu else P6P7(source, fpn_channels, relu=False)
    else:
        if p6_from is not None:
            raise ValueError("p6_from applies to RetinaNet only (Faster R-CNN's P6 is a max-pool of P5)")
        extra = LastLevelMaxPool()
    return BackboneWithFPN(body, {f"layer{k}": str(v) for v, k in enumerate(returned)}, in_channels,
                           fpn_channels, extra_blocks=extra, norm_layer=fpn_norm)


def _anchors(arch: str, anchor_sizes: Optional[Sequence[int]], levels: int) -> AnchorGenerator:
    base = list(anchor_sizes) if anchor_sizes is not None else \
        [32 * 2 ** i for i in range(levels)] if arch == "retinanet" else [32, 64, 128, 256, 512]
    if len(base) != levels:
        raise ValueError(f"anchor_sizes needs one size per FPN level ({levels}), got {list(base)}")
    if arch == "retinanet":  # three scales per octave, as torchvision's and mmdetection's RetinaNet
        sizes = tuple(tuple(int(s * 2 ** (i / 3)) for i in range(3)) for s in base)
    else:
        sizes = tuple((int(s),) for s in base)
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)


def _retinanet(backbone, num_classes: int, v2: bool, anchor_sizes, **kwargs) -> RetinaNet:
    anchor_generator = _anchors("retinanet", anchor_sizes, 5)
    head = RetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, 32) if v2 else None)
    if v2:
        head.regression_head._loss_type = "giou"  # torchvision's v2 factory sets its GIoU box loss this way
    return RetinaNet(backbone, num_classes, anchor_generator=anchor_generator, head=head, **kwargs)


def _fasterrcnn(backbone, num_classes: int, v2: bool, anchor_sizes, **kwargs) -> FasterRCNN:
    anchor_generator = _anchors("fasterrcnn", anchor_sizes, 5)
    extra = {}
    if v2:
        c = backbone.out_channels
        extra["rpn_head"] = RPNHead(c, anchor_generator.num_anchors_per_location()[0], conv_depth=2)
        extra["box_head"] = FastRCNNConvFCHead((c, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d)
    return FasterRCNN(backbone, num_classes=num_classes, rpn_anchor_generator=anchor_generator, **extra, **kwargs)


class DetectorFeatures(nn.Module):
    """A detector's backbone + FPN alone (a teacher needs nothing more): keys ``backbone.body.*`` and
    ``backbone.fpn.*``, as in the whole detector's state dict; ``forward(x)`` -> {"fpn.pN": [N, C, H, W]}."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> dict:
        return dict(zip(fpn_level_names(self.backbone), self.backbone(x).values()))


def build_detector(name: str, num_classes: int = 91, in_channels: int = 3, *, trainable_backbone_layers: int = 3,
                   frozen_bn: Optional[bool] = None, frozen_bn_eps: float = 1e-5, fpn_channels: int = 256,
                   p6_from: Optional[str] = None, p7_relu: bool = True, dcn_stages: Sequence[int] = (),
                   dcn_modulated: bool = True,
                   anchor_sizes: Optional[Sequence[int]] = None, min_size: int = 800, max_size: int = 1333,
                   features_only: bool = False, **kwargs) -> nn.Module:
    """Build detector ``name`` (see the module docstring) with ``num_classes`` classes including the
    background (COCO: 91 for torchvision's checkpoints, 81 for contiguous labels). ``frozen_bn_eps``:
    torchvision evaluates its v1 COCO checkpoints with 0.0 (``overwrite_eps``); 1e-5 elsewhere. Further keyword
    arguments go to torchvision's ``RetinaNet`` / ``FasterRCNN`` (``score_thresh``, ``nms_thresh``,
    ``detections_per_img``, ...). ``features_only``: a :class:`DetectorFeatures` (backbone + FPN).

    Example::
        model = build_detector("retinanet_resnet50_fpn", num_classes=91)
        model.load_state_dict(RetinaNet_ResNet50_FPN_Weights.COCO_V1.get_state_dict())  # as it is
    """
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"unknown detector {name!r}: use {{retinanet|fasterrcnn}}_<backbone>_fpn[_v2], "
                         f"e.g. {', '.join(EXAMPLES)}")
    if in_channels != 3:
        raise ValueError(f"{name}: detectors take RGB images (in_channels 3), got {in_channels}")
    if num_classes < 2:
        raise ValueError(f"{name}: num_classes counts the background too (categories + 1), got {num_classes}")
    arch, v2 = m.group("arch"), m.group("v2") is not None
    backbone = build_backbone_fpn(m.group("backbone"), arch, v2=v2, frozen_bn=(not v2) if frozen_bn is None
                                  else frozen_bn, frozen_bn_eps=frozen_bn_eps,
                                  trainable_backbone_layers=trainable_backbone_layers,
                                  fpn_channels=fpn_channels, p6_from=p6_from, p7_relu=p7_relu,
                                  dcn_stages=tuple(dcn_stages), dcn_modulated=dcn_modulated)
    if features_only:
        return DetectorFeatures(backbone)
    build = _retinanet if arch == "retinanet" else _fasterrcnn
    return build(backbone, num_classes, v2, anchor_sizes, min_size=min_size, max_size=max_size, **kwargs)


def fpn_level_names(backbone: nn.Module) -> list[str]:
    """``fpn.pN`` names of a ``BackboneWithFPN``'s outputs in order: P3..P7 (RetinaNet), P2..P6 (Faster R-CNN)."""
    first = min(int(k[len("layer"):]) for k in backbone.body.return_layers) + 1
    n = len(backbone.body.return_layers) + len(_extra_names(backbone))
    return [f"fpn.p{first + i}" for i in range(n)]


def _extra_names(backbone: nn.Module) -> list[str]:
    extra = backbone.fpn.extra_blocks
    if extra is None:
        return []
    return ["p6", "p7"] if hasattr(extra, "p7") else ["pool"]

