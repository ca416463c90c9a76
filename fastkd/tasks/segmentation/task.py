"""The semantic segmentation task: dense logits, cross-entropy with ignored pixels, mIoU.

- batch: :class:`fastkd.data.segmentation.loader.SegBatch` (uint8 images and label maps; normalised here on the device);
- student forward: ``model(x, features=True)`` -> stride-8 logits and the stage features; task losses
  ``ce`` (decode head) and ``aux_ce`` (auxiliary FCN head on layer3, already weighted by ``aux_weight``,
  0.4 in every mmseg recipe), each the cross-entropy of the logits upsampled (bilinear) to the label
  map, summed over labelled pixels and divided by all pixels of the micro-batch (mmseg's default,
  ``avg_non_ignore=False``);
- teacher forward: the same call without gradients: its logits (for the logit loss) and the features asked for;
- logit loss: channel-wise spatial-softmax KD (:class:`fastkd.losses.ChannelWiseKD`, MGD's ``use_logit``);
- evaluation: whole images at their stored resolution (mmseg's whole-image test mode: the images of a
  validation batch go through the model in groups of one size, never padded), argmax of the upsampled
  logits, mIoU / mAcc / aAcc / per-class IoU summed over every rank (:mod:`fastkd.tasks.segmentation.miou`): the
  numbers do not depend on ``val_batch_size`` or on which images share a batch.

Model options (``student.kwargs``): the factory's (``base_channels``, ``channels``, ``aux_channels``, ``dropout``,
``deep_stem``) and ``init_backbone: PATH``, ImageNet weights for the backbone in the open-mmlab v1c,
mmpretrain or torchvision layout (:mod:`fastkd.tasks.segmentation.backbone_init`; strict, one log line; a
missing file stops the run in preflight). A teacher loads ``teacher.checkpoint`` whole and takes no
``init_backbone``.

Data config (``data:``): ``source`` ffcv | cityscapes | fashion-scenes, ``path`` (a folder of
``train.beton`` / ``val.beton``, a Cityscapes root, or a fashion-scenes root), ``val_path``, ``mean`` /
``std`` (default ImageNet's, as mmseg's Cityscapes configs), ``num_workers``, ``image_size`` (the crop
side unless ``kwargs.crop_size`` is given) and ``kwargs``: ``crop_size``, ``img_scale``, ``ratio_range``,
``cat_max_ratio``, ``flip_prob``, ``photometric`` (:class:`fastkd.data.segmentation.transforms.SegTrainTransform`)
and ``val_batch_size`` (default 1; images of different sizes in a batch are run apart).
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, KDConfig, ModelConfig
from ...data import build_loaders
from ...data.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_coefficients
from ...data.segmentation.loader import SegBatch
from ...data.segmentation.transforms import IGNORE_INDEX
from ...losses import ChannelWiseKD
from ..base import Features, Task
from .miou import MIoU
from .models import MODELS


def seg_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """CE of ``logits`` [N, K, h, w] upsampled to ``labels`` [N, H, W]: sum over labelled pixels / all pixels."""
    up = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up.float(), labels, ignore_index=ignore_index, reduction="sum")
    return loss / labels.numel()


def _check_init_backbone(mcfg: ModelConfig, role: str) -> None:
    """ConfigError unless ``mcfg.kwargs.init_backbone`` is a file a student can start from."""
    path, key = mcfg.kwargs["init_backbone"], f"{role}.kwargs.init_backbone"
    if role == "teacher":
        raise ConfigError(f"{key}: a teacher loads its whole model from teacher.checkpoint; ImageNet weights start "
                          "a model that is trained (a teacher is trained as the student of a baseline run)")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}: a path to an ImageNet backbone checkpoint, got {path!r}")
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: {path} not found (ImageNet backbone weights, e.g. open-mmlab's resnet18_v1c: "
                          "https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth)")


class SegmentationTask(Task):
    """Semantic segmentation as a fastkd task (see the module docstring)."""

    name = "segmentation"
    headline = "mIoU"
    zoo = MODELS

    def __init__(self, cfg=None, *, aux_weight: float = 0.4, ignore_index: int = IGNORE_INDEX):
        super().__init__(cfg)
        self.aux_weight, self.ignore_index = float(aux_weight), int(ignore_index)
        data = cfg.data if cfg is not None else None
        custom = data is not None and data.mean is not None and data.std is not None
        self.mean = tuple(data.mean) if custom else IMAGENET_MEAN
        self.std = tuple(data.std) if custom else IMAGENET_STD
        self._coeffs: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    # -- models ----------------------------------------------------------------------------------------------
    def build_model(self, mcfg: ModelConfig, role: str) -> nn.Module:
        """The model; ``kwargs.init_backbone: PATH`` (a student's) loads ImageNet weights into its backbone
        (:mod:`fastkd.tasks.segmentation.backbone_init`: v1c, mmpretrain or torchvision layout, strict)."""
        path = mcfg.kwargs.get("init_backbone")
        if path is None:
            return super().build_model(mcfg, role)
        _check_init_backbone(mcfg, role)
        model = super().build_model(replace(mcfg, kwargs={k: v for k, v in mcfg.kwargs.items()
                                                          if k != "init_backbone"}), role)
        from .backbone_init import init_from_file

        init_from_file(model, path, f"{role}.kwargs.init_backbone")
        return model

    def preflight(self) -> None:
        """The ``init_backbone`` files exist (a run names a missing one before any set-up)."""
        if self.cfg is None:
            return
        for role in ("student", "teacher"):
            mcfg = getattr(self.cfg, role)
            if mcfg is not None and mcfg.kwargs.get("init_backbone") is not None:
                _check_init_backbone(mcfg, role)

    # -- data ------------------------------------------------------------------------------------------------
    def build_loaders(self, *, micro: int, grad_accum: int, rank: int, world: int, seed: int, device,
                      dtype=torch.float32, channels_last: bool = False):
        if self.cfg is None:
            raise ConfigError("the segmentation task needs the run's config to build its loaders")
        data = self.cfg.data
        if data.path is None:
            raise ConfigError("data.path is not set (a folder of train/val .beton, a Cityscapes root or a "
                              "fashion-scenes root)")
        try:
            return build_loaders("segmentation", data, batch_size=micro, rank=rank, world_size=world, seed=seed,
                                 device=device, grad_accum=grad_accum)
        except ValueError as exc:  # unknown source or option, a malformed dataset: name it, no traceback
            raise ConfigError(f"data: {exc}") from None

    def to_device(self, batch: SegBatch, device, dtype=torch.float32, channels_last: bool = False) -> SegBatch:
        device = torch.device(device)
        if device not in self._coeffs:
            self._coeffs[device] = normalize_coefficients(self.mean, self.std, device)
        scale, shift = self._coeffs[device]
        non_blocking = device.type == "cuda"
        images = batch.images.to(device, non_blocking=non_blocking)
        images = torch.addcmul(shift, images.float(), scale).to(dtype)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch.labels.to(device, non_blocking=non_blocking).long()
        return SegBatch(images, labels, getattr(batch, "sizes", None))

    def batch_size(self, batch: SegBatch) -> int:
        return int(batch.images.shape[0])

    # -- forward passes -------------------------------------------------------------------------------------
    def loss_names(self, student: nn.Module) -> List[str]:
        return ["ce", "aux_ce"] if getattr(student, "auxiliary_head", None) is not None else ["ce"]

    def student_forward(self, student: nn.Module, batch: SegBatch):
        logits, feats = student(batch.images, features=True)
        losses = {"ce": seg_cross_entropy(logits, batch.labels, self.ignore_index)}
        if "auxiliary_head" in feats:
            aux = seg_cross_entropy(feats["auxiliary_head"], batch.labels, self.ignore_index)
            losses["aux_ce"] = self.aux_weight * aux
        return losses, logits, feats

    @torch.no_grad()
    def teacher_forward(self, teacher: nn.Module, batch: SegBatch,
                        layers: Optional[Sequence[str]]) -> Tuple[torch.Tensor, Features]:
        images = batch.images.to(next(teacher.parameters()).dtype)  # a GPU teacher runs in bf16
        logits, feats = teacher(images, features=True)
        return logits, feats if layers is None else {name: feats[name] for name in layers}

    def logit_loss(self, kd: Optional[KDConfig], backend: str = "auto") -> Optional[nn.Module]:
        """The channel-wise spatial-softmax KD (one pure-PyTorch implementation: ``backend`` is not used)."""
        if kd is None:
            return None
        return ChannelWiseKD(temperature=kd.temperature, alpha=1.0 if kd.alpha == "auto" else float(kd.alpha))

    # -- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, val_loader, device, dtype=torch.float32) -> Dict[str, float]:
        """mIoU over the whole validation set; every rank returns the same dict."""
        return self._metric(model, val_loader, device, dtype).compute()  # dist: sums every rank's areas

    @torch.no_grad()
    def area_counts(self, model: nn.Module, val_loader, device, dtype=torch.float32) -> torch.Tensor:
        """[4, K] float64 intersection / union / prediction / label areas of this rank's images."""
        return self._metric(model, val_loader, device, dtype).counts

    def _metric(self, model: nn.Module, val_loader, device, dtype) -> MIoU:
        device = torch.device(device)
        num_classes = getattr(val_loader, "num_classes", None) or model.num_classes
        metric = MIoU(num_classes, self.ignore_index, device, getattr(val_loader, "classes", None) or None)
        for batch in val_loader:
            batch = self.to_device(batch, device, dtype)
            for (h, w), idx in batch.same_size_groups():  # each image whole, never beside padding
                whole = len(idx) == len(batch) and (h, w) == tuple(batch.images.shape[-2:])
                images = batch.images if whole else batch.images[idx, :, :h, :w]
                labels = batch.labels if whole else batch.labels[idx, :h, :w]
                metric.update(model(images).argmax(dim=1), labels)
        return metric

    def describe(self, metrics: Dict[str, float]) -> str:
        return (f"mIoU {metrics['mIoU']:.2f} mAcc {metrics['mAcc']:.2f} aAcc {metrics['aAcc']:.2f} "
                f"({int(metrics['pixels'])} labelled pixels)")

    def report(self, metrics: Dict[str, float]) -> str:
        """The log line, then IoU per class (nan: a class neither labelled nor predicted)."""
        per_class = [(k[len("IoU."):], v) for k, v in metrics.items() if k.startswith("IoU.")]
        width = max((len(name) for name, _ in per_class), default=0)
        return "\n".join([self.describe(metrics), "IoU per class (%):"]
                         + [f"  {name:<{width}}  {value:6.2f}" for name, value in per_class])
