"""mmdetection ResNet / ResNeXt + FPN checkpoints -> torchvision's layout (a teacher's backbone + FPN).

    fastkd convert mmdet cascade_mask_rcnn_x101_32x4d_fpn_dconv_c3-c5_1x_coco.pth teacher.pt

MGD's detection teachers are mmdetection checkpoints; a teacher needs only its backbone and FPN, so
those are converted (plus a RetinaNet head, which MGD's RetinaNet recipe copies into the student:
``init_neck_head``) and everything else (other heads) is dropped and counted. The key map (:data:`KEY_MAP`)
is explicit; an unknown backbone or neck key is an error naming the key. The output is a plain
state_dict with ``backbone.body.*`` / ``backbone.fpn.*`` keys that a ``features_only`` detector of
:func:`fastkd.tasks.detection.models.build_detector` (or the whole detector, for those keys) loads strictly;
:func:`convert` also says which fastkd model and options it maps to:

- the stages with ``conv2.conv_offset`` get deformable convolutions (``dcn_stages``; DCN v2 when the
  offset conv also predicts masks, 27 channels, v1 with 18);
- FPN with 3 lateral convs from C3 plus 2 extra convs (RetinaNet's ``add_extra_convs='on_input'``):
  P6 from C5 as torchvision's ``*_v2`` RetinaNet, but mmdetection applies no ReLU before the P7 conv
  (``relu_before_extra_convs=False`` in its RetinaNet configs; the weights cannot show it), so
  ``p7_relu: false``; with 4 laterals from C2 and no extra convs, Faster R-CNN's FPN (max-pool P6).

mmdetection's ``style='pytorch'`` ResNets (stride in the 3x3 conv) map to torchvision's; ``caffe``-style
ones (stride in the first 1x1) do not, and their weights cannot show it: use pytorch-style checkpoints.
BatchNorm's ``num_batches_tracked`` is dropped (the teacher's BatchNorm is frozen).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

from ...atomic import atomic_write
from ...config import ConfigError

# (mmdetection key pattern, torchvision key template); the FPN output convs are resolved afterwards,
# since which of neck.fpn_convs.{i} are P6/P7 depends on the number of lateral convs.
KEY_MAP: List[Tuple[str, str]] = [
    (r"backbone\.(conv1\.weight)", r"backbone.body.\1"),
    (r"backbone\.(bn1\.(?:weight|bias|running_mean|running_var))", r"backbone.body.\1"),
    (r"backbone\.(layer[1-4]\.\d+\.conv[123]\.weight)", r"backbone.body.\1"),
    (r"backbone\.(layer[1-4]\.\d+\.conv2\.conv_offset\.(?:weight|bias))", r"backbone.body.\1"),
    (r"backbone\.(layer[1-4]\.\d+\.bn[123]\.(?:weight|bias|running_mean|running_var))", r"backbone.body.\1"),
    (r"backbone\.(layer[1-4]\.\d+\.downsample\.[01]\.(?:weight|bias|running_mean|running_var))",
     r"backbone.body.\1"),
    (r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)", r"FPN_OUT.\1.\2"),
]
_DROPPED = re.compile(r".*\.num_batches_tracked")
_BOTTLENECK_DEPTH = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_BASIC_DEPTH = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}


@dataclasses.dataclass
class Conversion:
    """What a converted checkpoint is: the fastkd model it loads into and what was left out."""
    state_dict: Dict[str, torch.Tensor]
    model: str                      # e.g. "retinanet_resnext101_64x4d_fpn"
    kwargs: Dict[str, object]       # build_detector options the weights need (dcn_stages, p6_from, ...)
    dropped: Dict[str, int]         # top-level prefix of dropped keys -> count (heads)
    num_classes: Optional[int] = None  # torchvision classes (with background) of a converted RetinaNet head

    def describe(self) -> str:
        opts = ", ".join(f"{k}: {v}" for k, v in self.kwargs.items()) or "none"
        dropped = ", ".join(f"{k} ({n} keys)" for k, n in sorted(self.dropped.items())) or "nothing"
        head = any(k.startswith("head.") for k in self.state_dict)
        what = "backbone + FPN + RetinaNet head (for init_neck_head; a teacher loads backbone + FPN)" if head \
            else "backbone + FPN"
        classes = f", num_classes {self.num_classes}" if self.num_classes else ""
        return (f"{len(self.state_dict)} tensors, {what} -> model {self.model}{classes} with options {{{opts}}}; "
                f"dropped: {dropped}")


def map_keys(keys: List[str]) -> Dict[str, str]:
    """mmdetection key -> torchvision key for every backbone / neck key (others are not in the result).

    Raises ConfigError naming a backbone or neck key that the map does not know (a deep stem, a neck
    with norm layers, ...).
    """
    out, unknown = {}, []
    for key in keys:
        if not key.startswith(("backbone.", "neck.")) or _DROPPED.fullmatch(key):
            continue
        for pattern, template in KEY_MAP:
            if re.fullmatch(pattern, key):
                out[key] = re.sub(pattern, template, key)
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:6]) + (f", ... ({len(unknown) - 6} more)" if len(unknown) > 6 else "")
        raise ConfigError(f"mmdetection keys with no torchvision counterpart: {shown} (supported: ResNet/ResNeXt "
                          "with a plain stem, optional DCN in conv2, FPN without norm layers)")
    lateral_idx = [int(k.split(".")[3]) for k in out.values() if k.startswith("backbone.fpn.inner_blocks.")]
    n_lat = max(lateral_idx, default=-1) + 1
    extras = {0: "p6", 1: "p7"}
    for key, value in out.items():
        if value.startswith("FPN_OUT."):
            _, i, param = value.split(".")
            i = int(i)
            if i < n_lat:
                out[key] = f"backbone.fpn.layer_blocks.{i}.0.{param}"
            elif i - n_lat in extras:
                out[key] = f"backbone.fpn.extra_blocks.{extras[i - n_lat]}.{param}"
            else:
                raise ConfigError(f"{key}: more than two extra FPN convs are not supported")
    return out


# mmdetection's RetinaHead -> torchvision's RetinaNetHead (v1: no norm); the class logits are expanded
# by :func:`convert_retina_head` (mmdetection has no background logit, torchvision's label 0 is it)
RETINA_HEAD_MAP: List[Tuple[str, str]] = [
    (r"bbox_head\.cls_convs\.(\d+)\.conv\.(weight|bias)", r"head.classification_head.conv.\1.0.\2"),
    (r"bbox_head\.reg_convs\.(\d+)\.conv\.(weight|bias)", r"head.regression_head.conv.\1.0.\2"),
    (r"bbox_head\.retina_reg\.(weight|bias)", r"head.regression_head.bbox_reg.\1"),
]
PRIOR_PROB = 0.01  # RetinaNet's initial foreground probability, for the added background logit


def convert_retina_head(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmdetection RetinaHead tensors in torchvision's layout (for ``init_neck_head``).

    Both order a level's outputs anchor-major (anchors by ratio, then scale, the same ratios and
    octave scales) with the classes (mmdetection) or the 4 box deltas (dx, dy, dw, dh; both with unit
    weights) minor. mmdetection's class c becomes torchvision's label c + 1; label 0 (background, never a
    training target) gets zero weights and the prior bias, as torchvision initialises it.
    """
    out = {}
    for key, value in state.items():
        for pattern, template in RETINA_HEAD_MAP:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, template, key)] = value
    w, b = state["bbox_head.retina_cls.weight"], state["bbox_head.retina_cls.bias"]
    anchors = state["bbox_head.retina_reg.weight"].shape[0] // 4
    classes = w.shape[0] // anchors
    w = w.reshape(anchors, classes, *w.shape[1:])
    b = b.reshape(anchors, classes)
    w0 = torch.zeros(anchors, 1, *w.shape[2:], dtype=w.dtype)
    b0 = torch.full((anchors, 1), -math.log((1 - PRIOR_PROB) / PRIOR_PROB), dtype=b.dtype)
    out["head.classification_head.cls_logits.weight"] = torch.cat([w0, w], 1).reshape(-1, *w.shape[2:])
    out["head.classification_head.cls_logits.bias"] = torch.cat([b0, b], 1).reshape(-1)
    return out


def _blocks(state: Dict[str, torch.Tensor], stage: int) -> int:
    idx = {int(k.split(".")[2]) for k in state if k.startswith(f"backbone.layer{stage}.")}
    return max(idx) + 1 if idx else 0


def infer_model(state: Dict[str, torch.Tensor]) -> Tuple[str, Dict[str, object]]:
    """The fastkd detector name and ``build_detector`` options that an mmdetection checkpoint maps to."""
    if "backbone.layer1.0.conv1.weight" not in state or "neck.lateral_convs.0.conv.weight" not in state:
        raise ConfigError("not an mmdetection ResNet/ResNeXt + FPN checkpoint: backbone.layer1.0.conv1.weight or "
                          "neck.lateral_convs.0.conv.weight is missing")
    blocks = tuple(_blocks(state, s) for s in (1, 2, 3, 4))
    bottleneck = "backbone.layer1.0.conv3.weight" in state
    depth = (_BOTTLENECK_DEPTH if bottleneck else _BASIC_DEPTH).get(blocks)
    if depth is None:
        raise ConfigError(f"backbone blocks per stage {blocks} match no ResNet depth (18/34/50/101/152)")
    width, per_group = state["backbone.layer1.0.conv2.weight"].shape[:2]  # [G * W, W, 3, 3] in stage 1
    groups = width // per_group
    if not bottleneck or (groups, per_group) == (1, 64):
        backbone = f"resnet{depth}"
    elif (groups, per_group) == (1, 128):
        backbone = f"wide_resnet{depth}_2"
    else:
        backbone = f"resnext{depth}_{groups}x{per_group}d"
    kwargs: Dict[str, object] = {}
    dcn = sorted({int(k.split(".")[1][len("layer"):]) for k in state if k.endswith("conv2.conv_offset.weight")})
    if dcn:
        offsets = {state[f"backbone.layer{s}.0.conv2.conv_offset.weight"].shape[0] for s in dcn}
        if offsets - {18, 27} or len(offsets) != 1:
            raise ConfigError(f"deformable convs with offset channels {sorted(offsets)}: only one deform group "
                              "(18: DCN, 27: modulated DCN v2) is supported")
        kwargs["dcn_stages"] = dcn
        kwargs["dcn_modulated"] = offsets == {27}
    laterals = sorted({int(k.split(".")[2]) for k in state if k.startswith("neck.lateral_convs.")})
    outs = sorted({int(k.split(".")[2]) for k in state if k.startswith("neck.fpn_convs.")})
    c_first = state["neck.lateral_convs.0.conv.weight"].shape[1]
    fpn_channels = int(state["neck.lateral_convs.0.conv.weight"].shape[0])
    if fpn_channels != 256:
        kwargs["fpn_channels"] = fpn_channels
    from_c2 = c_first == (256 if bottleneck else 64)
    if len(laterals) == 4 and from_c2 and len(outs) == 4:
        return f"fasterrcnn_{backbone}_fpn", kwargs
    if len(laterals) == 3 and not from_c2 and len(outs) == 5:
        p6_in = state["neck.fpn_convs.3.conv.weight"].shape[1]
        c5 = state["neck.lateral_convs.2.conv.weight"].shape[1]
        kwargs["p6_from"] = "c5" if p6_in == c5 else "p5"
        kwargs["p7_relu"] = False
        return f"retinanet_{backbone}_fpn", kwargs
    raise ConfigError(f"FPN with {len(laterals)} lateral convs (first from {c_first} channels) and {len(outs)} "
                      "output convs is neither RetinaNet's (C3-C5 + 2 extra convs) nor Faster R-CNN's (C2-C5)")


def convert(state: Dict[str, torch.Tensor]) -> Conversion:
    """Convert an mmdetection state_dict (already unwrapped from ``{"state_dict": ...}``)."""
    name, kwargs = infer_model(state)
    mapping = map_keys(list(state))
    out = {mapping[k]: state[k] for k in state if k in mapping}
    used, num_classes = set(mapping), None
    if name.startswith("retinanet_") and {"bbox_head.retina_cls.weight", "bbox_head.retina_reg.weight"} <= set(state):
        head = convert_retina_head(state)
        out.update(head)
        used |= {k for k in state if k.startswith("bbox_head.")}
        anchors = head["head.regression_head.bbox_reg.bias"].numel() // 4
        num_classes = head["head.classification_head.cls_logits.bias"].numel() // anchors
    dropped: Dict[str, int] = {}
    for key in state:
        if key not in used:
            prefix = "num_batches_tracked" if _DROPPED.fullmatch(key) else key.split(".")[0]
            dropped[prefix] = dropped.get(prefix, 0) + 1
    return Conversion(out, name, kwargs, dropped, num_classes)


def load_mmdet(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of an mmdetection checkpoint (``{"state_dict": ..., "meta": ...}`` or a bare state_dict)."""
    if not os.path.isfile(path):
        raise ConfigError(f"mmdetection checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file, or pickled objects beyond tensors and containers
        raise ConfigError(f"{path} cannot be read as a checkpoint: {type(exc).__name__}: {exc}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return state


def convert_file(src: str, dst: str) -> Conversion:
    """Convert ``src`` and write the state_dict to ``dst`` atomically (a temporary file, then a rename)."""
    conv = convert(load_mmdet(src))
    with atomic_write(dst, "wb") as f:
        torch.save(conv.state_dict, f)
    return conv
