"""Backend registry and dispatch for the fused losses.

A backend is an object with
    name: str
    unavailable() -> str | None           why it cannot run at all here (not built, no triton, ...)
    refuse(op, **inputs) -> str | None    why it cannot run these inputs (device, dtype, shape, ...)
    mgd_loss / ct_loss / kd_loss(...)     the ops it implements (same signature as fastkd.ops)
Backends are imported lazily, so a missing optional dependency never breaks ``import fastkd``.
``auto`` considers the backends of the device's preference list that accept the inputs; when more than
one does, it runs the one measured fastest on this machine for the inputs' shape bucket (a short trial
at first use, cached in memory and on disk, the same on every rank: ``fastkd.ops._auto``), else the
first of the list (the static order, also what FASTKD_AUTO_TRIAL=0 and torch.compile traces without a
decision use). ``explain`` reports why every other backend was refused, and the choice with its timings.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _auto

# name -> "module:attribute" of the backend object. Other backends add themselves here.
_REGISTRY: Dict[str, str] = {
    "reference": "fastkd.ops._reference_backend:BACKEND",
    "triton": "fastkd.ops._triton_backend:BACKEND",
    "csrc": "fastkd.ops._csrc_backend:BACKEND",
}
# Static preference order of ``auto`` per device type ("reference" always accepts), with per-op
# exceptions keyed "device:op" (none at present). The candidates of the measured ``auto`` and, without
# a measurement, the order itself (first acceptable wins). From benchmarks/results/cpu.md (2-core
# runs): on the CPU csrc is the faster at the demo's shapes; at 7x7 maps with 512+ channels the eager
# reference can be faster (issue 15), which the measurement finds per machine.
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
    first call of an op inside a compiled region finds everything already imported (and ``auto``'s
    decisions cached on disk already read). Import failures are recorded (and reported by ``explain``),
    never raised.
    """
    _auto.preload(("cuda", "cpu") if torch.cuda.is_available() else ("cpu",))
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


class Explanation(list):
    """``explain``'s answer: [(backend, reason refused or None)], plus what ``auto`` runs and why.

    choice   the backend ``auto`` runs for these inputs now (None if none accepts)
    how      "static order ...", "only one accepts", "measured", "disk cache", or "rank N" (agreed
             across ranks: that rank's measurement)
    ms       {backend: best ms of one call in the trial} behind a measured choice ({} otherwise)
    """

    def __init__(self, rows, choice: Optional[str], how: str, ms: Dict[str, float]):
        super().__init__(rows)
        self.choice, self.how, self.ms = choice, how, dict(ms)

    def __str__(self) -> str:
        lines = [f"auto -> {self.choice} ({self.how})"]
        for name, why in self:
            timing = f"{self.ms[name]:.3f} ms" if name in self.ms else "-"
            lines.append(f"  {name:<10} {'accepts' if why is None else 'refused: ' + why}  [{timing}]")
        return "\n".join(lines)


def _auto_how(op: str, dev_type: str, inputs: dict, accepted: List[str]) -> Tuple[Optional[str], str, dict]:
    if not accepted:
        return None, "no backend accepts", {}
    if len(accepted) == 1:
        return accepted[0], "only one accepts", {}
    if not _auto.enabled():
        return accepted[0], "static order (FASTKD_AUTO_TRIAL=0)", {}
    d = _auto.status(op, dev_type, inputs)
    if d is not None and d.source == "pending":
        return accepted[0], "static order: measured here, agreed across ranks at this op's next 2^k-th call", d.ms
    if d is None or d.choice not in accepted:
        return accepted[0], "static order: not measured yet (measured at the first auto call)", {}
    return d.choice, d.source, d.ms


def explain(op: str, device: torch.device | str, **inputs) -> Explanation:
    """[(backend, reason or None)] in ``auto`` order for this device, then the remaining backends;
    ``.choice``, ``.how`` and ``.ms`` say what ``auto`` runs for these inputs and the timings behind it
    (``print(explain(...))`` shows it all)."""
    dev_type = torch.device(device).type
    candidates = [b for b in auto_order(op, dev_type) if b in _REGISTRY]
    order = candidates + [b for b in _REGISTRY if b not in candidates]
    rows = [(b, refusal(b, op, inputs)) for b in order]
    accepted = [b for b, why in rows if why is None and b in candidates]
    return Explanation(rows, *_auto_how(op, dev_type, inputs, accepted))


def select(op: str, backend: str, device: torch.device | str, inputs: dict,
           run: Optional[Callable] = None, args: Optional[dict] = None):
    """The backend object to run ``op``: the named one, or for ``auto`` the accepting backend measured
    fastest (when ``run(backend, **args)`` can run the op for a trial), else the first accepting one.

    ``inputs`` are what backends judge and what keys the shape bucket; ``args`` all the op's tensor and
    other arguments that ``run`` takes (copied, detached, for the trial).
    """
    if backend != "auto":
        why = refusal(backend, op, inputs)
        if why:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run these inputs: {why}")
        return _LOADED[backend]
    dev_type = torch.device(device).type
    sig = None
    if run is not None and not torch.compiler.is_compiling():  # steady state: one dict lookup
        sig = _auto.signature(op, dev_type, inputs)
        hit = _auto.memo_get(sig)
        if hit is not None:
            return _LOADED[hit]
    accepted: Dict[str, object] = {}
    reasons = []
    for name in auto_order(op, dev_type):
        if name not in _REGISTRY:
            continue
        why = refusal(name, op, inputs)
        if why is None:
            accepted[name] = _LOADED[name]
        else:
            reasons.append(f"{name}: {why}")
    if not accepted:
        raise BackendUnavailableError(f"{op}: no backend accepts these inputs on {dev_type}: " + "; ".join(reasons))
    if run is None or len(accepted) == 1:
        return next(iter(accepted.values()))
    choice = _auto.choose(op, dev_type, inputs, accepted, run, args or {})
    if sig is not None and _auto.settled(op, dev_type, inputs, choice):
        _auto.memo_put(sig, choice)
    return accepted[choice]


# Backend modules are imported here, once (cheap: compiled parts load later, in unavailable()), so that the
# first call of an op inside a torch.compile'd region finds them: importlib cannot be traced.
for _name in list(_REGISTRY):
    _load(_name)
