"""Make a foreign nn.Module (torchvision, timm, your own) follow fastkd's model contract.

Native fastkd models return their stage features from ``forward``; a foreign model does not, so
:class:`FeatureAdapter` captures the outputs of named submodules with forward hooks (the only place
fastkd uses hooks). The wrapped model is ``adapter.model``: its ``state_dict`` keys are the adapter's
without the ``model.`` prefix, which is what an exported student should carry.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn


class _Capture:
    """Forward hook that stores a submodule's output under ``name`` in a dict owned by the adapter
    (an object, not a closure, so ``copy.deepcopy`` of the adapter rewires it to the copy's dict)."""

    def __init__(self, name: str, store: dict):
        self.name, self.store = name, store

    def __call__(self, module: nn.Module, inputs, output) -> None:
        self.store[self.name] = output


def _closest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class FeatureAdapter(nn.Module):
    """Wraps ``model`` so that ``adapter(x)`` -> logits and ``adapter(x, features=True)`` ->
    ``(logits, {name: output of submodule name})`` for each name in ``feature_layers``.

    ``feature_channels`` / ``feature_reductions`` are taken from the arguments when given for every
    layer; otherwise they are measured once here with a forward of one dummy image of ``input_size``
    (C, H, W; default: the first conv's input channels, 224, 224) in eval mode without gradients,
    on the model's device (the train/eval flags of all submodules are restored afterwards).

    A feature is the submodule's output tensor itself: if the model later changes it in place (a
    hooked conv followed by ``ReLU(inplace=True)``), hook the activation instead; a submodule called
    several times per forward reports its last call. Captured tensors are dropped after each forward.
    """

    def __init__(self, model: nn.Module, feature_layers: Sequence[str], *,
                 feature_channels: Optional[Mapping[str, int]] = None,
                 feature_reductions: Optional[Mapping[str, int]] = None,
                 input_size: Optional[Sequence[int]] = None):
        super().__init__()
        if isinstance(feature_layers, str) or not feature_layers:
            raise ValueError(f"feature_layers must be a non-empty list of submodule names, "
                             f"got {feature_layers!r}")
        modules = dict(model.named_modules())
        for name in feature_layers:
            if name not in modules or name == "":
                raise ValueError(f"{type(model).__name__} has no submodule {name!r}"
                                 f"{_closest(name, modules)} (see model.named_modules())")
        self.model = model
        self.feature_layers = list(feature_layers)
        self._captured: dict = {}
        for name in self.feature_layers:
            modules[name].register_forward_hook(_Capture(name, self._captured))
        channels = dict(feature_channels or {})
        reductions = dict(feature_reductions or {})
        if any(n not in channels or n not in reductions for n in self.feature_layers):
            probed_c, probed_r = self._probe(input_size)
            channels, reductions = {**probed_c, **channels}, {**probed_r, **reductions}
        self.feature_channels = {n: int(channels[n]) for n in self.feature_layers}
        self.feature_reductions = {n: int(reductions[n]) for n in self.feature_layers}

    def _probe(self, input_size: Optional[Sequence[int]]) -> tuple[dict, dict]:
        """One dummy forward to read each feature's channels and spatial reduction."""
        if input_size is None:
            conv = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
            if conv is None:
                raise ValueError("cannot guess the input size of a model without Conv2d: "
                                 "pass input_size=(C, H, W) or feature_channels and feature_reductions")
            input_size = (conv.in_channels, 224, 224)
        c, h, w = (int(v) for v in input_size)
        ref = next(iter(self.model.parameters()), None)
        if ref is None:
            ref = next(iter(self.model.buffers()), torch.zeros(()))
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        flags = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            with torch.no_grad():
                _, feats = self(torch.zeros(1, c, h, w, device=ref.device, dtype=dtype), features=True)
        finally:
            for m, flag in flags.items():
                m.training = flag
        channels, reductions = {}, {}
        for name, f in feats.items():
            if not torch.is_tensor(f) or f.dim() != 4:
                shape = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
                raise ValueError(f"feature layer {name!r} gives {shape}, not a [N, C, H, W] tensor; "
                                 "choose a layer with a spatial feature map")
            channels[name] = f.shape[1]
            reductions[name] = max(1, round(h / f.shape[2]))
        return channels, reductions

    def forward(self, x: torch.Tensor, features: bool = False):
        self._captured.clear()
        try:
            out = self.model(x)
            feats = dict(self._captured)
        finally:
            self._captured.clear()  # do not keep activations (and their graph) alive between steps
        if not torch.is_tensor(out):
            raise TypeError(f"{type(self.model).__name__} returned {type(out).__name__}, not a logits "
                            "tensor; wrap it so that forward returns the logits")
        if not features:
            return out
        missing = [n for n in self.feature_layers if n not in feats]
        if missing:
            raise RuntimeError(f"feature layers {missing} of {type(self.model).__name__} did not run "
                               "in this forward")
        return out, {n: feats[n] for n in self.feature_layers}

    def extra_repr(self) -> str:
        return f"feature_layers={self.feature_layers}"


def adapt(module: nn.Module, feature_layers: Sequence[str], **kwargs) -> FeatureAdapter:
    """Wrap a foreign ``module`` into the fastkd contract, capturing ``feature_layers`` with hooks.

    Keyword arguments go to :class:`FeatureAdapter` (``feature_channels``, ``feature_reductions``,
    ``input_size``).

    Example::
        tv = torchvision.models.resnet50(weights="DEFAULT")
        teacher = adapt(tv, ["layer3", "layer4"])
        logits, feats = teacher(images, features=True)   # feats["layer4"]: [N, 2048, H/32, W/32]
    """
    return FeatureAdapter(module, feature_layers, **kwargs)
