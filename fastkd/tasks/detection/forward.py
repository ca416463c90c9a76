"""One forward of a torchvision detector that returns its losses and its FPN levels.

torchvision's ``RetinaNet.forward`` / ``FasterRCNN.forward`` return losses *or* detections and keep the
features to themselves; distillation needs the losses *and* the FPN levels of the same pass. These
functions run the same steps by calling the detector's own submodules (backbone, head / rpn / roi_heads,
anchor generator, ``compute_loss``, ``postprocess_detections``), so the backbone runs once and no hook is
involved. The input is a batch that is already normalised and padded (fastkd's loaders resize and pad to
bucket shapes), with each image's unpadded size: torchvision's ``GeneralizedRCNNTransform`` (normalise,
resize, pad) is not run, and the detections stay in the resized image's pixels (the COCO evaluator maps
them back to the original image).

    losses, feats = train_forward(model, images, sizes, targets)   # model.train(); feats {"fpn.p3": ...}
    detections = predict(model, images, sizes)                      # model.eval(); boxes xyxy
    feats = fpn_features(teacher, images)                           # backbone + FPN only
    dense = torch.compile(partial(dense_forward, model), fullgraph=True)  # backbone + FPN (+ RetinaNet head)
    losses, feats = train_forward(model, images, sizes, targets, dense=dense)
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet

from .models import fpn_level_names

RETINANET_LOSSES = ["classification", "bbox_regression"]
FASTERRCNN_LOSSES = ["loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"]


def loss_names(model: nn.Module) -> List[str]:
    """The names of the loss terms ``train_forward`` returns for ``model``."""
    if isinstance(model, RetinaNet):
        return list(RETINANET_LOSSES)
    if isinstance(model, FasterRCNN):
        return list(FASTERRCNN_LOSSES)
    raise TypeError(f"{type(model).__name__} is neither a torchvision RetinaNet nor a FasterRCNN")


def fpn_features(model: nn.Module, images: Tensor) -> Dict[str, Tensor]:
    """``model.backbone(images)`` (backbone + FPN) with its levels named ``fpn.pN``."""
    feats = model.backbone(images)
    return dict(zip(fpn_level_names(model.backbone), feats.values()))


def _named(model: nn.Module, feats) -> Dict[str, Tensor]:
    return dict(zip(fpn_level_names(model.backbone), feats.values()))


def dense_forward(model: nn.Module, images: Tensor) -> Tuple[Dict[str, Tensor], Optional[Dict[str, Tensor]]]:
    """The fixed-shape part of a detector: backbone + FPN (levels in torchvision's order and names) and,
    for RetinaNet, its head outputs (None for Faster R-CNN, whose RPN and RoI heads run with their
    data-dependent proposal steps). Traces with ``torch.compile(fullgraph=True)``: a caller compiles it,
    e.g. ``dense=torch.compile(functools.partial(dense_forward, model))``, and passes it to
    :func:`train_forward` / :func:`predict`; matching, sampling and NMS stay eager.
    """
    feats = model.backbone(images)
    head_outputs = model.head(list(feats.values())) if isinstance(model, RetinaNet) else None
    return feats, head_outputs


Dense = Callable[[Tensor], Tuple[Dict[str, Tensor], Optional[Dict[str, Tensor]]]]


def train_forward(model: nn.Module, images: Tensor, image_sizes: Sequence[Tuple[int, int]],
                  targets: List[Dict[str, Tensor]], dense: Optional[Dense] = None
                  ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """The detector's training losses and its FPN levels from one pass (``model`` in training mode).

    images: [N, 3, H, W] normalised, padded; image_sizes: each image's (h, w) before padding; targets: per
    image ``boxes`` float [K, 4] xyxy in those pixels and ``labels`` int64 [K] (1..C, 0 is background).
    ``dense``: :func:`dense_forward` of ``model`` (default), or a compiled version of it.
    Returns torchvision's loss dict (RetinaNet: classification, bbox_regression; Faster R-CNN:
    loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg) and {"fpn.pN": [N, C, h, w]}.
    """
    _check(model)
    image_list = ImageList(images, [(int(h), int(w)) for h, w in image_sizes])
    feats, head_outputs = (dense or partial(dense_forward, model))(images)
    if isinstance(model, RetinaNet):
        levels = list(feats.values())
        losses = model.compute_loss(targets, head_outputs, model.anchor_generator(image_list, levels))
    else:
        proposals, rpn_losses = model.rpn(image_list, feats, targets)
        _, roi_losses = model.roi_heads(feats, proposals, image_list.image_sizes, targets)
        losses = {**roi_losses, **rpn_losses}
    return losses, _named(model, feats)


def predict(model: nn.Module, images: Tensor, image_sizes: Sequence[Tuple[int, int]],
            dense: Optional[Dense] = None) -> List[Dict[str, Tensor]]:
    """Detections per image (``boxes`` xyxy in the resized image's pixels, ``scores``, ``labels``), as
    torchvision's eval forward computes them (``model`` in eval mode)."""
    _check(model)
    image_list = ImageList(images, [(int(h), int(w)) for h, w in image_sizes])
    feats, head_outputs = (dense or partial(dense_forward, model))(images)
    if isinstance(model, RetinaNet):
        return _retinanet_detections(model, image_list, list(feats.values()), head_outputs)
    proposals, _ = model.rpn(image_list, feats)
    detections, _ = model.roi_heads(feats, proposals, image_list.image_sizes)
    return detections


def _check(model: nn.Module) -> None:
    if not isinstance(model, (RetinaNet, FasterRCNN)):
        raise TypeError(f"{type(model).__name__} is neither a torchvision RetinaNet nor a FasterRCNN")


def _retinanet_detections(model: RetinaNet, image_list: ImageList, levels: List[Tensor],
                          head_outputs: Dict[str, Tensor]) -> List[Dict[str, Tensor]]:
    """Split the head outputs and anchors per level, then RetinaNet's own top-k, decoding and NMS."""
    anchors = model.anchor_generator(image_list, levels)
    per_location = model.anchor_generator.num_anchors_per_location()[0]
    counts = [f.shape[2] * f.shape[3] * per_location for f in levels]
    split_outputs = {k: list(v.split(counts, dim=1)) for k, v in head_outputs.items()}
    split_anchors = [list(a.split(counts)) for a in anchors]
    return model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
