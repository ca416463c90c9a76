"""Build a model by name: the native zoo, or torchvision / timm models behind ``tv:`` / ``timm:``.

Native models need nothing but torch. ``build("tv:<name>")`` and ``build("timm:<name>")`` import
torchvision / timm on first use (never at import time) and wrap the model with
:func:`fastkd.models.adapt`, so every model built here follows the same contract. A task with models of
its own (segmentation's PSPNet / DeepLabV3) passes them as ``zoo``: their names are then known too.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Mapping, Optional, Sequence

from torch import nn

from . import cifar_resnet, convnet, mobilenet, resnet
from .adapter import FeatureAdapter

_NATIVE: dict[str, Callable[..., nn.Module]] = {
    # ImageNet ResNets with torchvision's state_dict keys; stages layer1..layer4
    "resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101, "resnet152": resnet.resnet152,
    "resnext50_32x4d": resnet.resnext50_32x4d, "wide_resnet50_2": resnet.wide_resnet50_2,
    # MGD's ImageNet MobileNetV1; stages model.1, model.3, model.5, model.11, model.13
    "mobilenet_v1": mobilenet.mobilenet_v1,
    # CIFAR ResNets (3x3 stem, no max-pool); stages layer1..layer3
    "resnet8": cifar_resnet.resnet8, "resnet14": cifar_resnet.resnet14,
    "resnet20": cifar_resnet.resnet20, "resnet32": cifar_resnet.resnet32,
    "resnet44": cifar_resnet.resnet44, "resnet56": cifar_resnet.resnet56,
    "resnet110": cifar_resnet.resnet110, "resnet8x4": cifar_resnet.resnet8x4,
    "resnet32x4": cifar_resnet.resnet32x4,
    # plain ConvNets for Fashion-MNIST-sized inputs; stages stage1..stage3
    "convnet_tiny": convnet.convnet_tiny, "convnet_small": convnet.convnet_small,
    "convnet_base": convnet.convnet_base,
}

_PREFIXES = {"tv": "torchvision", "timm": "timm"}


Zoo = Mapping[str, Callable[..., nn.Module]]


def list_models(zoo: Optional[Zoo] = None) -> list[str]:
    """Names of the native models (and of ``zoo``), sorted. ``tv:<name>`` / ``timm:<name>`` are also
    accepted by :func:`build` when torchvision / timm are installed."""
    return sorted({**_NATIVE, **(zoo or {})})


def build(name: str, num_classes: int = 1000, *, zoo: Optional[Zoo] = None, **kwargs) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way classifier (or dense head).

    Native names (:func:`list_models`) and those of ``zoo`` (a task's own models, name -> factory) take
    ``in_channels`` and the model's own options (e.g. ``zero_init_residual``). ``tv:<name>`` builds
    ``torchvision.models.get_model(name, ...)``, ``timm:<name>`` builds ``timm.create_model(name, ...)``;
    both take ``feature_layers=[...]`` (defaults: ``layer1``..``layer4`` for torchvision ResNets,
    ``feature_info`` for timm) plus ``input_size`` and the library's own keyword arguments (``weights=``,
    ``pretrained=``, ...).

    Raises ValueError for an unknown name (with the closest known one), ImportError when the
    package behind a prefix is not importable.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    prefix, sep, rest = name.partition(":")
    if sep:
        if prefix not in _PREFIXES:
            raise ValueError(f"unknown model prefix {prefix!r} in {name!r}: use one of "
                             f"{', '.join(p + ':' for p in _PREFIXES)} or a native name")
        return _build_foreign(prefix, rest, num_classes, **kwargs)
    factories = {**_NATIVE, **(zoo or {})}
    if name not in factories:
        close = difflib.get_close_matches(name, list(factories), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(list_models(zoo))} "
                         "(and tv:<torchvision name>, timm:<timm name>)")
    return factories[name](num_classes=num_classes, **kwargs)


def _import(prefix: str, name: str):
    package = _PREFIXES[prefix]
    try:
        return importlib.import_module(package)
    except Exception as err:  # a broken install (e.g. a CUDA-only wheel) fails with more than ImportError
        raise ImportError(f"build({prefix + ':' + name!r}) needs the package {package!r}, which "
                          f"cannot be imported here ({type(err).__name__}: {err}); install it or "
                          f"use a native model ({', '.join(list_models())})") from err


def _build_foreign(prefix: str, name: str, num_classes: int, *,
                   feature_layers: Optional[Sequence[str]] = None,
                   input_size: Optional[Sequence[int]] = None, **kwargs) -> FeatureAdapter:
    lib = _import(prefix, name)
    if prefix == "tv":
        model = lib.models.get_model(name, num_classes=num_classes, **kwargs)
        channels = reductions = None
        if feature_layers is None:
            if not all(hasattr(model, f"layer{i}") for i in range(1, 5)):
                top = ", ".join(n for n, _ in model.named_children())
                raise ValueError(f"tv:{name} is not ResNet-shaped: pass feature_layers=[...] "
                                 f"(submodule names; its top-level children are: {top})")
            feature_layers = [f"layer{i}" for i in range(1, 5)]
    else:
        model = lib.create_model(name, num_classes=num_classes, **kwargs)
        info = [dict(i) for i in getattr(model, "feature_info", None) or []]
        channels = {i["module"]: i["num_chs"] for i in info if "module" in i and "num_chs" in i}
        reductions = {i["module"]: i["reduction"] for i in info if "module" in i and "reduction" in i}
        if feature_layers is None:
            if not channels:
                raise ValueError(f"timm:{name} has no feature_info: pass feature_layers=[...]")
            feature_layers = list(channels)
    return FeatureAdapter(model, feature_layers, feature_channels=channels,
                          feature_reductions=reductions, input_size=input_size)
