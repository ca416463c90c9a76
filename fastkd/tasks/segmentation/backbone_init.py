"""ImageNet backbone weights -> the segmentation models' ResNet (``init_backbone``, ``fastkd convert backbone``).

mmsegmentation's recipes start the backbone of every model (students and the PSPNet-R101 teacher alike)
from ImageNet weights, ``pretrained='open-mmlab://resnet18_v1c'`` (``resnet50_v1c``, ``resnet101_v1c``).
Three key layouts of such a file are recognised from their stem keys and mapped onto
:mod:`fastkd.tasks.segmentation.models`' names by an explicit key map (the body, ``layer1``..``layer4``
with ``convK`` / ``bnK`` / ``downsample.{0,1}``, is named alike in all three):

    layout        stem keys in the file                        -> fastkd         classifier (ignored)
    v1c           stem.{0,1,3,4,6,7}.*   (mmcv / mmseg ResNetV1c:   unchanged      fc.*
                  the open-mmlab://resnetXX_v1c files; fastkd's own names)
    mmpretrain    [backbone.]stem.{0,1,2}.{conv,bn}.*  (ResNetV1c,  stem.{3i,3i+1}.*  head.fc.*
                  ConvModules; bare or inside ``state_dict``)
    torchvision   [backbone.]conv1.*, bn1.*  (torchvision ResNet,   stem.{0,1}.*      fc.*
                  mmpretrain's plain ResNet: a 7x7 stem)

The three v1c / mmpretrain layouts have the deep stem (three 3x3 convs) of the models' default
``deep_stem=True``; a torchvision file has a plain 7x7 stem and fits only a model built with
``deep_stem: false``: the other way round is refused, naming the stem. Loading is strict: every tensor of
the model's ``stem`` and ``layer1``..``layer4`` must come from the file (the BatchNorm ``num_batches_tracked``
counters may be absent: old files have none), every tensor of the file must have a place, shapes must agree.

Example::
    fastkd convert backbone resnet18_v1c-b5776b93.pth checkpoints/resnet18_v1c.pt --model pspnet_r18
    # or name the file itself in a config: student.kwargs.init_backbone: checkpoints/resnet18_v1c-b5776b93.pth
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ...config import ConfigError

LAYOUTS = {"v1c": "open-mmlab v1c", "mmpretrain": "mmpretrain ResNetV1c", "torchvision": "torchvision ResNet"}
CLASSIFIER = ("fc.", "head.fc.")  # an ImageNet classifier's last layer: never part of the backbone
BODY = re.compile(r"^layer[1-4]\.")
_MMPRETRAIN_STEM = re.compile(r"^stem\.([0-2])\.(conv|bn)\.(.+)$")
_PLAIN_STEM = re.compile(r"^(conv1|bn1)\.(.+)$")


@dataclass
class Loaded:
    """What ``init_backbone`` loaded: the tensor count, the layout recognised and the keys left out."""

    count: int
    layout: str
    ignored: List[str]

    def describe(self, path: str) -> str:
        shown = ", ".join(self.ignored[:4]) + (f", ... ({len(self.ignored) - 4} more)" if len(self.ignored) > 4 else "")
        return (f"init_backbone: loaded {self.count} tensors from {path} (layout: {LAYOUTS[self.layout]})"
                + (f", ignored: {shown}" if self.ignored else ""))


def _listing(keys: List[str], limit: int = 4) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def detect_layout(state: Dict[str, torch.Tensor]) -> str:
    """``v1c``, ``mmpretrain`` or ``torchvision``, from the stem keys of ``state`` (``backbone.`` stripped).
    Raises ValueError when there is no ResNet stem."""
    keys = list(state)
    if any(_MMPRETRAIN_STEM.match(k) for k in keys):
        return "mmpretrain"
    if any(re.match(r"^stem\.\d+\.", k) for k in keys):
        return "v1c"
    if "conv1.weight" in state:
        return "torchvision"
    top = sorted({k.split(".")[0] for k in keys})[:8]
    raise ValueError(f"no ResNet stem (stem.* or conv1.*) among its keys (top-level names: {', '.join(top)}): "
                     "not an ImageNet ResNet backbone in the v1c, mmpretrain or torchvision layout")


def split_classifier(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(the backbone's tensors without a ``backbone.`` prefix, the classifier keys left out).

    A file whose keys carry ``backbone.`` (an mmpretrain ``ImageClassifier``) keeps only those, the rest
    being the classifier's; other keys are kept as they are, but for ``fc.*``."""
    prefixed = any(k.startswith("backbone.") for k in state)
    body, ignored = {}, []
    for key, value in state.items():
        if key.startswith(CLASSIFIER):
            ignored.append(key)
        elif prefixed and key.startswith("backbone."):
            body[key[len("backbone."):]] = value
        else:
            body[key] = value
    return body, ignored


def to_native(state: Dict[str, torch.Tensor], layout: str) -> Dict[str, torch.Tensor]:
    """Rename the stem keys of a ``layout`` state dict (classifier and prefix already removed) to fastkd's."""
    out = {}
    for key, value in state.items():
        m = _MMPRETRAIN_STEM.match(key) if layout == "mmpretrain" else _PLAIN_STEM.match(key)
        if m and layout == "mmpretrain":
            key = f"stem.{3 * int(m[1]) + (m[2] == 'bn')}.{m[3]}"
        elif m and layout == "torchvision":
            key = f"stem.{int(m[1] == 'bn1')}.{m[2]}"
        out[key] = value
    return out


def native_backbone(state: Dict[str, torch.Tensor], layout: Optional[str] = None,
                    source: str = "checkpoint") -> Tuple[Dict[str, torch.Tensor], str, List[str]]:
    """(backbone tensors under fastkd's names, the layout, the classifier keys left out) of an ImageNet
    state dict; ``layout`` given: the file must be in it. Raises ValueError naming ``source``."""
    body, ignored = split_classifier(state)
    try:
        found = detect_layout(body)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    if layout is not None and layout != found:
        raise ValueError(f"{source} is in the {LAYOUTS[found]} layout ({found}), not {layout}")
    return to_native(body, found), found, ignored


def backbone_keys(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's ``stem`` and ``layer1``..``layer4`` tensors (parameters and buffers) by name."""
    return {k: v for k, v in model.state_dict().items() if k.startswith("stem.") or BODY.match(k)}


def check_fit(model: nn.Module, state: Dict[str, torch.Tensor], layout: str, culprit: str,
              options: str = "student.kwargs") -> None:
    """ConfigError (one line, starting with ``culprit``) unless ``state`` covers the model's backbone exactly
    (``options``: where the model's options are set, for the hint about its stem)."""
    deep, file_deep = bool(getattr(model, "deep_stem", True)), layout != "torchvision"
    if deep != file_deep:
        stems = {True: "a deep stem (three 3x3 convs, ResNet-V1c)", False: "a plain 7x7 stem (conv1, bn1)"}
        hint = (f"use the open-mmlab resnetXX_v1c weights (or mmpretrain's ResNetV1c), or set "
                f"{options}.deep_stem: false" if deep else f"remove {options}.deep_stem: false")
        raise ConfigError(f"{culprit} is a {LAYOUTS[layout]} checkpoint with {stems[file_deep]}, and the model has "
                          f"{stems[deep]}: {hint}")
    own = backbone_keys(model)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    bad = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
           if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        found = (("missing", missing), ("unexpected", unexpected), ("shape mismatches (file vs model)", bad))
        parts = [f"{what} ({len(keys)}): {_listing(keys)}" for what, keys in found if keys]
        if any(k.startswith(("decode_head.", "auxiliary_head.")) for k in unexpected):
            parts.append("this is a whole segmentation model: convert it with `fastkd convert mmseg` and give it "
                         "as student.checkpoint")
        raise ConfigError(f"{culprit} ({LAYOUTS[layout]} layout) does not fit the model's backbone: "
                          + "; ".join(parts))


def init_backbone(model: nn.Module, state: Dict[str, torch.Tensor], path: str,
                  key: str = "student.kwargs.init_backbone") -> Loaded:
    """Load the ImageNet backbone ``state`` (from ``path``, named by config ``key``) into ``model``'s stem and
    layers, strictly (see the module docstring); the heads keep their initialisation."""
    culprit = f"{key}: {path}"
    try:
        native, layout, ignored = native_backbone(state, source=culprit)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_fit(model, native, layout, culprit, key.rsplit(".", 1)[0])
    model.load_state_dict(native, strict=False)  # strict on the keys checked above; the heads are not in it
    return Loaded(len(native), layout, ignored)


def init_from_file(model: nn.Module, path: str, key: str) -> Loaded:
    """``init_backbone`` from a file (``state_dict`` / ``model`` / ``module`` wrappers unwrapped), with the
    one log line on the first process."""
    from ...models.loading import load_state_dict_file

    loaded = init_backbone(model, load_state_dict_file(path, key), path, key)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[fastkd] {loaded.describe(path)}", file=sys.stderr, flush=True)
    return loaded


def convert_file(src: str, dst: str, *, layout: Optional[str] = None, model: Optional[str] = None,
                 num_classes: int = 19, force: bool = False) -> Tuple[Dict[str, torch.Tensor], Loaded]:
    """Write the backbone of ImageNet checkpoint ``src`` to ``dst`` (atomically) in the layout ``init_backbone``
    reads directly: v1c (fastkd's names) for a deep stem, torchvision's for a plain one; the classifier and
    any ``backbone.`` / ``state_dict`` wrapping left out. With ``model`` (e.g. ``pspnet_r18``) it is first
    checked strictly against that model's backbone, so a wrong depth fails before anything is written."""
    from ...models.loading import load_state_dict_file

    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} exists; refusing to overwrite it (use --force)")
    state = load_state_dict_file(src, "backbone")
    try:
        native, found, ignored = native_backbone(state, layout, src)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if model is not None:
        from ...models import build
        from .models import MODELS

        kwargs = {} if found != "torchvision" else {"deep_stem": False}
        check_fit(build(model, num_classes=num_classes, zoo=MODELS, **kwargs), native, found, src)
    directory = os.path.dirname(os.path.abspath(dst))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dst) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:  # a deep stem under fastkd's names (= the v1c layout), a plain one under torchvision's
        torch.save(native if found != "torchvision" else split_classifier(state)[0], tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return native, Loaded(len(native), found, ignored)
