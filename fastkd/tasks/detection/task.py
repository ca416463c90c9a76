"""The detection task: torchvision's RetinaNet / Faster R-CNN distilled on their FPN levels.

Batches are :class:`fastkd.data.detection.batch.DetectionBatch` (images padded to bucket shapes, targets in
the resized image's pixels). The student's training forward is one pass returning torchvision's loss
dict and the FPN levels ``fpn.pN`` (:func:`fastkd.tasks.detection.forward.train_forward`); the teacher
is its backbone + FPN alone, loaded from the ``backbone.*`` part of a detector checkpoint (a torchvision
detector's, or ``fastkd convert mmdet``'s output). No logit loss. Evaluation: the detector in eval mode
over the validation loader, COCO box AP by pycocotools (``bbox_AP`` first).

Model options (``student.kwargs`` / ``teacher.kwargs``) are :func:`fastkd.tasks.detection.models.build_detector`'s,
plus for the student ``init_backbone: PATH`` (an ImageNet ResNet/ResNeXt state dict in torchvision's
layout, e.g. torchvision's ``IMAGENET1K_V1`` file, as mmdetection's recipes start from ImageNet weights)
and ``init_neck_head: PATH``: start the FPN and the heads from that detector checkpoint (MGD's RetinaNet
recipe initialises the student's neck and head from the teacher's). A student whose backbone starts from
random weights (no ``init_backbone`` nor ``student.checkpoint``) trains every stage with trainable
BatchNorm by default, as torchvision's factories without pretrained weights (:func:`from_scratch`). Data options
(``data.kwargs``): ``min_size`` / ``max_size`` (resize, default 800 / 1333), ``flip_prob`` (default 0.5),
``val_batch_size``, ``max_dets`` (detections kept per image, COCO's maxDets, default 100: every AP is
computed at this limit and the log says which), ``results_path`` (write the COCO results JSON there).
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...config import ConfigError, ModelConfig
from ..base import Task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the parts of a detector's state dict that make its neck and heads (for init_neck_head)
NECK_HEAD_PREFIXES = ("backbone.fpn.", "head.", "rpn.", "roi_heads.")


def _unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a DeepSpeed engine / DDP wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def train_targets(targets: Sequence[dict]) -> List[Dict[str, torch.Tensor]]:
    """torchvision's training targets: boxes and labels of the non-crowd objects (crowd boxes are not
    trained on; an image without boxes stays, with empty tensors, so every rank runs the same modules)."""
    out = []
    for t in targets:
        keep = t["iscrowd"] == 0 if "iscrowd" in t else slice(None)
        out.append({"boxes": t["boxes"][keep], "labels": t["labels"][keep]})
    return out


def backbone_state(state: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """The ``backbone.*`` (backbone + FPN) part of a detector state dict; a teacher needs nothing more."""
    kept = {k: v for k, v in state.items() if k.startswith("backbone.")}
    if not kept:
        top = sorted({k.split(".")[0] for k in state})[:8]
        raise ConfigError(f"teacher checkpoint {path} has no backbone.* keys (top-level names: {', '.join(top)}); "
                          "a detection teacher is a torchvision-layout detector checkpoint, e.g. from "
                          "`fastkd convert mmdet`")
    return kept


def init_backbone(student: nn.Module, state: Dict[str, torch.Tensor], path: str) -> int:
    """Load an ImageNet classifier's state dict (torchvision ResNet keys; ``fc.*`` ignored) into the
    detector's backbone body, every body tensor required; returns the count."""
    body = student.backbone.body
    own = body.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own if k in state and
           state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise ConfigError(f"student.kwargs.init_backbone: {path} does not fit the student's backbone: "
                          + "; ".join(f"{what} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                                      for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                         ("shape mismatches", bad)) if keys))
    body.load_state_dict(state, strict=False)  # strict on the keys checked above; FrozenBN has no counters
    return len(state)


def init_neck_head(student: nn.Module, state: Dict[str, torch.Tensor], path: str) -> int:
    """Copy the FPN and head tensors of ``state`` into ``student`` (MGD's ``init_student``); returns the count.
    Shapes must agree (same FPN width, anchors and classes); the backbone body is left as it is."""
    own = student.state_dict()
    picked = {k: v for k, v in state.items() if k.startswith(NECK_HEAD_PREFIXES) and k in own}
    wanted = [k for k in own if k.startswith(NECK_HEAD_PREFIXES)]
    missing = [k for k in wanted if k not in picked]
    bad = [f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in picked.items() if v.shape != own[k].shape]
    if missing or bad:
        raise ConfigError(f"student.kwargs.init_neck_head: {path} cannot initialise the student's neck and head: "
                          + (f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else "")
                             if missing else "")
                          + (f" shape mismatches {', '.join(bad[:4])}" if bad else ""))
    student.load_state_dict(picked, strict=False)
    return len(picked)


# torchvision's factories without pretrained weights: every backbone stage trains, with trainable BatchNorm
SCRATCH = {"trainable_backbone_layers": 5, "frozen_bn": False}


def from_scratch(name: str, kwargs: dict) -> dict:
    """The model options of a student whose backbone starts from random weights (no ``init_backbone``, no
    ``student.checkpoint``), as torchvision's factories build it then: every stage trainable, BatchNorm
    trainable (they freeze the stem, layer1 and the BatchNorm statistics only for pretrained weights).
    An explicit value is kept (e.g. to time a recipe's structure), with a warning: it freezes random weights."""
    frozen = {k: kwargs[k] for k, v in SCRATCH.items() if k in kwargs and kwargs[k] != v}
    if frozen:
        warnings.warn(f"{name}: student.kwargs {', '.join(f'{k}={v}' for k, v in frozen.items())} freezes part of a "
                      "backbone that starts from random weights (no init_backbone, no student.checkpoint); "
                      f"torchvision trains it whole then ({', '.join(f'{k}={v}' for k, v in SCRATCH.items())})",
                      stacklevel=3)
    return {**SCRATCH, **kwargs}


class DetectionTask(Task):
    """``task: detection`` (see the module docstring)."""

    name = "detection"
    headline = "bbox_AP"
    compiles_itself = True  # train.compile: the dense part only (see student_forward), not the whole forward

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self._compiled: Dict[int, object] = {}  # id(student) -> its compiled dense part (train.compile)

    # -- models ----------------------------------------------------------------------------------------
    def build_model(self, mcfg: ModelConfig, role: str) -> nn.Module:
        kwargs = dict(mcfg.kwargs)
        inits = {k: kwargs.pop(k) for k in ("init_backbone", "init_neck_head") if k in kwargs}
        if role == "teacher":
            if inits:
                raise ConfigError(f"teacher.kwargs.{next(iter(inits))}: only a student is initialised this way "
                                  "(the teacher loads teacher.checkpoint)")
            kwargs["features_only"] = True
        elif "init_backbone" not in inits and not mcfg.checkpoint:
            kwargs = from_scratch(mcfg.name, kwargs)
        try:
            from .models import build_detector  # imports torchvision
            model = build_detector(mcfg.name, num_classes=mcfg.num_classes, in_channels=mcfg.in_channels, **kwargs)
        except (ValueError, ImportError, TypeError) as exc:
            raise ConfigError(f"{role}.name {mcfg.name!r}: {exc}") from None
        if inits:
            from ...models.loading import load_state_dict_file

            for key, fn in (("init_backbone", init_backbone), ("init_neck_head", init_neck_head)):
                if key in inits:
                    fn(model, load_state_dict_file(inits[key], f"student.kwargs.{key}"), inits[key])
        return model

    def load_teacher(self, mcfg: ModelConfig, device: torch.device) -> nn.Module:
        """Backbone + FPN of a detector checkpoint, strictly loaded, frozen; bf16 + channels_last on GPU."""
        from ...models.loading import freeze, load_state_dict_file, load_strict

        if not mcfg.checkpoint:
            raise ConfigError("teacher.checkpoint is required (a detector checkpoint; its backbone + FPN are used)")
        state = backbone_state(load_state_dict_file(mcfg.checkpoint, "teacher"), mcfg.checkpoint)
        teacher = self.build_model(mcfg, "teacher")
        load_strict(teacher, state, mcfg.checkpoint, "teacher")
        teacher = freeze(teacher).to(device)
        if device.type == "cuda":
            teacher = teacher.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        return teacher

    # -- data ------------------------------------------------------------------------------------------
    def preflight(self) -> None:
        """What evaluation needs, checked before training starts rather than when it ends: a valid
        ``max_dets``, and the ground truth the val .beton's sidecar names (an absolute path recorded when
        the .beton was written)."""
        import os

        from ...data.detection.coco import CocoFormatError, read_sidecar

        data = self.cfg.data if self.cfg is not None else None
        max_dets = data.kwargs.get("max_dets", 100) if data is not None else 100
        if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 1:
            raise ConfigError(f"data.kwargs.max_dets: the detections per image scored must be an integer >= 1, "
                              f"got {max_dets!r}")
        val = data and (data.val_path or data.path)
        if not val or not os.path.isfile(val):
            return  # no .beton there: the loader says so
        try:
            gt = read_sidecar(val).get("annotations")
        except CocoFormatError as exc:
            raise ConfigError(str(exc)) from None
        if not gt or not os.path.isfile(gt):
            raise ConfigError(f"ground truth {gt} not found: evaluation of {val} reads it (its path was recorded in "
                              f"{val}.json when the .beton was written); put it back there, or write the .beton "
                              "again with `fastkd data write coco`")

    def build_loaders(self, *, micro: int, grad_accum: int, rank: int, world: int, seed: int,
                      device: torch.device, dtype: torch.dtype = torch.float32,
                      channels_last: bool = False) -> Tuple[object, object]:
        if self.cfg is None:
            raise ConfigError("the detection task needs the run's config to build its loaders")
        data = self.cfg.data
        if data.path is None:
            raise ConfigError("data.path: the detection task needs a COCO .beton (fastkd data write coco)")
        return _detection_loaders(data, batch_size=micro, seed=seed, rank=rank, world_size=world,
                                  grad_accum=grad_accum)

    def to_device(self, batch, device: torch.device, dtype: torch.dtype, channels_last: bool):
        from ...data.detection.batch import to_device

        data = self.cfg.data if self.cfg is not None else None
        mean = (data.mean if data is not None and data.mean else None) or IMAGENET_MEAN
        std = (data.std if data is not None and data.std else None) or IMAGENET_STD
        return to_device(batch, device, mean=mean, std=std, dtype=dtype, channels_last=channels_last)

    def batch_size(self, batch) -> int:
        return len(batch.targets)

    # -- forwards --------------------------------------------------------------------------------------
    def loss_names(self, student: nn.Module) -> List[str]:
        from .forward import loss_names

        return loss_names(_unwrap(student))

    def student_forward(self, student: nn.Module, batch):
        """One pass: torchvision's losses + the FPN levels. With ``train.compile`` the fixed-shape part
        (backbone + FPN + RetinaNet head) runs compiled, one graph per bucket shape; anchor matching,
        sampling and the loss reductions stay eager (``compiles_itself``: the Distiller does not compile
        this method as a whole)."""
        from .forward import train_forward

        model = _unwrap(student)
        sizes = [tuple(t["size"]) for t in batch.targets]
        losses, feats = train_forward(model, batch.images, sizes, train_targets(batch.targets),
                                      dense=self._dense(model))
        return losses, None, feats

    def _dense(self, model: nn.Module):
        """The compiled dense part of ``model`` when the config asks for compilation (built once)."""
        if self.cfg is None or not self.cfg.train.compile:
            return None
        if id(model) not in self._compiled:
            from functools import partial

            from .forward import dense_forward

            self._compiled[id(model)] = torch.compile(partial(dense_forward, model), fullgraph=True, dynamic=False)
        return self._compiled[id(model)]

    @torch.no_grad()
    def teacher_forward(self, teacher: nn.Module, batch, layers: Optional[Sequence[str]] = None):
        from .models import DetectorFeatures
        from .forward import fpn_features

        model = _unwrap(teacher)
        p = next(model.parameters())
        images = batch.images.to(p.dtype)
        # a teacher (DetectorFeatures) is called as a module, so that its torch.compile wrapper runs;
        # a whole detector (the trainer probes the student's levels this way) through its backbone
        is_features = isinstance(getattr(model, "_orig_mod", model), DetectorFeatures)
        feats = model(images) if is_features else fpn_features(model, images)
        if layers is None:
            return None, feats
        missing = [n for n in layers if n not in feats]
        if missing:
            raise ConfigError(f"the teacher has no FPN level {missing[0]!r}; levels: {', '.join(feats)}")
        return None, {n: feats[n] for n in layers}

    def logit_loss(self, kd=None, backend: Optional[str] = None) -> Optional[nn.Module]:
        if kd is not None:
            raise ConfigError("distill.kd: logit KD is not used for detection (distil the FPN levels); "
                              "remove distill.kd")
        return None

    # -- evaluation ------------------------------------------------------------------------------------
    def describe(self, metrics: Dict[str, float]) -> str:
        """The six AP numbers and the limit of detections per image they were computed at."""
        from .coco_eval import METRICS

        limit = f" (maxDets {int(metrics['bbox_max_dets'])})" if "bbox_max_dets" in metrics else ""
        return " ".join(f"{k} {metrics[k]:.4g}" for k in METRICS if k in metrics) + limit

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device, dtype: torch.dtype) -> Dict[str, float]:
        """COCO box AP of ``model`` (eval mode) over this rank's part of ``loader``, every rank's gathered."""
        from .forward import predict

        device = getattr(device, "device", device)  # a DistContext or a device
        net = _unwrap(model)
        results, image_ids = [], []
        for batch in loader:
            batch = self.to_device(batch, device, dtype, channels_last=False)
            detections = predict(net, batch.images, [tuple(t["size"]) for t in batch.targets])
            results.extend(_to_coco(detections, batch.targets, loader))
            image_ids.extend(int(t["image_id"]) for t in batch.targets)
        return _coco_metrics(results, image_ids, loader, self.cfg)


# -- the coupling to fastkd.data's COCO loaders and evaluator, kept here in three small functions ----------
def _detection_loaders(data, **kwargs):
    from ...data import build_loaders

    try:
        return build_loaders("detection", data, **kwargs)
    except ValueError as exc:  # a malformed .beton or option: name it, no traceback
        raise ConfigError(f"data: {exc}") from None


def _to_coco(detections, targets, loader) -> List[dict]:
    from .coco_eval import detections_to_coco

    return detections_to_coco(detections, targets, loader.label_to_category)


def _coco_metrics(results: List[dict], image_ids: List[int], loader, cfg) -> Dict[str, float]:
    from .coco_eval import evaluate_coco

    kwargs = cfg.data.kwargs if cfg is not None else {}
    return evaluate_coco(results, loader.meta["annotations"], image_ids=image_ids,
                         results_path=kwargs.get("results_path"), max_dets=int(kwargs.get("max_dets", 100)))
