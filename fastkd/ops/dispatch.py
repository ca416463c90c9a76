"""Backend registry and dispatch for the fused losses.

A backend is an object with
    name: str
    unavailable() -> str | None           why it cannot run at all here (not built, no triton, ...)
    refuse(op, **inputs) -> str | None    why it cannot run these inputs (device, dtype, shape, ...)
    mgd_loss / ct_loss / kd_loss(...)     the ops it implements (same signature as fastkd.ops)
Backends are imported lazily, so a missing optional dependency never breaks ``import fastkd``.
``auto`` tries the device's preference list in order and takes the first that accepts the inputs;
``explain`` reports why every other backend was refused.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Tuple

import torch

# name -> "module:attribute" of the backend object. Other backends add themselves here.
_REGISTRY: Dict[str, str] = {
    "reference": "fastkd.ops._reference_backend:BACKEND",
    "triton": "fastkd.ops._triton_backend:BACKEND",
    "csrc": "fastkd.ops._csrc_backend:BACKEND",
}
# Preference order of ``auto`` per device type (first acceptable wins; "reference" always accepts),
# with per-op exceptions keyed "device:op" (none at present). Chosen by measurement
# (benchmarks/results/cpu.md, 2-core runs): on the CPU the csrc MGD (Winograd) is 1.6-2.0x the eager
# reference and the csrc CT 1.3-1.7x at every benchmarked shape.
AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["triton", "reference"],
    "cpu": ["csrc", "reference"],
}


def auto_order(op: str, dev_type: str) -> List[str]:
    """Backends ``auto`` tries for ``op`` on a device type, in order."""
    return AUTO_ORDER.get(f"{dev_type}:{op}") or AUTO_ORDER.get(dev_type, ["reference"])
_LOADED: Dict[str, object] = {}
_LOAD_ERRORS: Dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run the given inputs; the message says why."""


def register(name: str, target: str) -> None:
    """Register a backend as ``"module:attribute"`` (imported on first use)."""
    _REGISTRY[name] = target
    _LOADED.pop(name, None)
    _LOAD_ERRORS.pop(name, None)


def known_backends() -> List[str]:
    return list(_REGISTRY)


def _load(name: str):
    if name in _LOADED:
        return _LOADED[name]
    if name in _LOAD_ERRORS:
        return None
    module, attr = _REGISTRY[name].split(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except Exception as exc:  # an optional backend failing to import must not break the others
        _LOAD_ERRORS[name] = f"import of {module} failed: {type(exc).__name__}: {exc}"
        return None
    _LOADED[name] = obj
    return obj


def preload(op: Optional[str] = None) -> None:
    """Import every registered backend (and the kernel module of ``op``) now, eagerly.

    torch.compile cannot trace ``importlib``: the loss modules call this at construction so that the
    first call of an op inside a compiled region finds everything already imported. Import failures
    are recorded (and reported by ``explain``), never raised.
    """
    for name in _REGISTRY:
        backend = _load(name)
        if backend is None:
            continue
        backend.unavailable()  # backends load their compiled parts here (once, cached)
        warm = getattr(backend, "preload", None)
        if warm is not None and op is not None:
            warm(op)


def refusal(name: str, op: str, inputs: dict) -> Optional[str]:
    """Why backend ``name`` cannot run ``op`` on ``inputs`` (None if it can)."""
    if name not in _REGISTRY:
        return f"no backend named {name!r} (known: {', '.join(known_backends())})"
    backend = _load(name)
    if backend is None:
        return _LOAD_ERRORS[name]
    why = backend.unavailable()
    if why:
        return why
    if not hasattr(backend, op):
        return f"backend {name!r} does not implement {op}"
    return backend.refuse(op, **inputs)


def explain(op: str, device: torch.device | str, **inputs) -> List[Tuple[str, Optional[str]]]:
    """[(backend, reason or None)] in ``auto`` order for this device, then the remaining backends."""
    dev_type = torch.device(device).type
    order = [b for b in auto_order(op, dev_type) if b in _REGISTRY]
    order += [b for b in _REGISTRY if b not in order]
    return [(b, refusal(b, op, inputs)) for b in order]


def select(op: str, backend: str, device: torch.device | str, inputs: dict):
    """The backend object to run ``op``: the named one, or the first acceptable one for ``auto``."""
    if backend != "auto":
        why = refusal(backend, op, inputs)
        if why:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run these inputs: {why}")
        return _LOADED[backend]
    dev_type = torch.device(device).type
    reasons = []
    for name in auto_order(op, dev_type):
        if name not in _REGISTRY:
            continue
        why = refusal(name, op, inputs)
        if why is None:
            return _LOADED[name]
        reasons.append(f"{name}: {why}")
    raise BackendUnavailableError(f"{op}: no backend accepts these inputs on {dev_type}: " + "; ".join(reasons))


# Backend modules are imported here, once (cheap: compiled parts load later, in unavailable()), so that the
# first call of an op inside a torch.compile'd region finds them: importlib cannot be traced.
for _name in list(_REGISTRY):
    _load(_name)
