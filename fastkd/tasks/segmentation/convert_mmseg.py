"""mmsegmentation checkpoints -> fastkd's segmentation models (``fastkd convert mmseg CKPT OUT``).

An explicit key map (a state-dict adapter): every key of an mmseg ``EncoderDecoder`` with a
``ResNetV1c`` backbone and a PSP / ASPP decode head (+ FCN auxiliary head) has exactly one native
name in :mod:`fastkd.tasks.segmentation.models`; a key no rule knows is an error that names it.

    backbone.stem.{0,1,3,4,6,7}.*                 -> stem.*                         (deep stem, same indices)
    backbone.layerI.J.{conv,bn}K / downsample.*   -> layerI.J.*                     (torchvision block names)
    decode_head.psp_modules.I.1.{conv,bn}.*       -> decode_head.ppm.I.1.{0,1}.*
    decode_head.image_pool.1.{conv,bn}.*          -> decode_head.image_pool.{1,2}.* (torchvision ASPPPooling)
    decode_head.aspp_modules.I.{conv,bn}.*        -> decode_head.aspp.I.{0,1}.*
    decode_head.bottleneck.{conv,bn}.*            -> decode_head.bottleneck.{0,1}.*
    auxiliary_head.convs.I.{conv,bn}.*            -> auxiliary_head.convs.I.{0,1}.*
    {decode,auxiliary}_head.conv_seg.*            -> unchanged

Example::
    fastkd convert mmseg pspnet_r101-d8_512x1024_40k_cityscapes_20200604_232751-467e7cf4.pth \\
        teachers/pspnet_r101.pt --model pspnet_r101
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

import torch

from ...atomic import atomic_write

_CONV_BN = {"conv": "0", "bn": "1"}

# (pattern on the mmseg key, replacement builder); the first rule that matches wins.
_RULES = [
    (re.compile(r"^backbone\.(stem\.\d+\..+)$"), lambda m: m[1]),
    (re.compile(r"^backbone\.(layer\d+\.\d+\.(?:conv\d|bn\d|downsample\.[01])\..+)$"), lambda m: m[1]),
    (re.compile(r"^decode_head\.psp_modules\.(\d+)\.1\.(conv|bn)\.(.+)$"),
     lambda m: f"decode_head.ppm.{m[1]}.1.{_CONV_BN[m[2]]}.{m[3]}"),
    (re.compile(r"^decode_head\.image_pool\.1\.(conv|bn)\.(.+)$"),
     lambda m: f"decode_head.image_pool.{1 + int(_CONV_BN[m[1]])}.{m[2]}"),
    (re.compile(r"^decode_head\.aspp_modules\.(\d+)\.(conv|bn)\.(.+)$"),
     lambda m: f"decode_head.aspp.{m[1]}.{_CONV_BN[m[2]]}.{m[3]}"),
    (re.compile(r"^decode_head\.bottleneck\.(conv|bn)\.(.+)$"),
     lambda m: f"decode_head.bottleneck.{_CONV_BN[m[1]]}.{m[2]}"),
    (re.compile(r"^auxiliary_head\.convs\.(\d+)\.(conv|bn)\.(.+)$"),
     lambda m: f"auxiliary_head.convs.{m[1]}.{_CONV_BN[m[2]]}.{m[3]}"),
    (re.compile(r"^((?:decode|auxiliary)_head\.conv_seg\.(?:weight|bias))$"), lambda m: m[1]),
]


class ConversionError(ValueError):
    """The checkpoint is not an mmseg model this converter knows; the message names the keys."""


def convert_key(key: str) -> Optional[str]:
    """The native name of mmseg key ``key``, or None when no rule knows it."""
    for pattern, build in _RULES:
        m = pattern.match(key)
        if m:
            return build(m)
    return None


def convert_state_dict(state: Dict[str, torch.Tensor], source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """mmseg state dict -> native state dict (same tensors). Raises ConversionError listing unknown keys."""
    out: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    for key, value in state.items():
        new = convert_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown) - 8} more)" if len(unknown) > 8 else "")
        hint = " (a non-deep stem: only ResNet-V1c backbones are supported)" if any(
            k.startswith(("backbone.conv1", "backbone.bn1")) for k in unknown) else ""
        raise ConversionError(f"{source}: {len(unknown)} key(s) no mmseg rule knows{hint}: {shown}")
    return out


def load_mmseg_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` of an mmseg checkpoint file (``{"meta", "state_dict", "optimizer"}``, or bare)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mmseg checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: say which and why
        raise ConversionError(f"{path} cannot be read as a checkpoint: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def convert_checkpoint(path: str, out: str, *, model: Optional[str] = None, num_classes: int = 19,
                       force: bool = False) -> Dict[str, torch.Tensor]:
    """Convert ``path`` and write the native state dict to ``out`` (atomically).

    With ``model`` (a name of :mod:`fastkd.tasks.segmentation.models`, e.g. ``pspnet_r101``), the result is first loaded
    strictly into that model, so a wrong architecture fails before anything is written.
    """
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; refusing to overwrite it (use --force)")
    state = convert_state_dict(load_mmseg_checkpoint(path), path)
    if model is not None:
        from ...models import build
        from ...models.loading import load_strict
        from .models import MODELS

        load_strict(build(model, num_classes=num_classes, zoo=MODELS), state, path, f"converted {model}")
    with atomic_write(out, "wb") as f:
        torch.save(state, f)
    return state
