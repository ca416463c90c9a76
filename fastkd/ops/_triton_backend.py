"""The Triton backend: fused kernels on CUDA (and on the CPU under TRITON_INTERPRET=1, for tests).

The kernels live in one file per op (``mgd_triton.py``, ``ct_triton.py``); each exposes
``refuse(**inputs) -> str | None`` and its loss entry point. This object only routes to them.
"""
from __future__ import annotations

import importlib
import os


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _TritonBackend:
    name = "triton"
    _modules = {"mgd_loss": "fastkd.ops.mgd_triton", "ct_loss": "fastkd.ops.ct_triton"}

    def __init__(self):
        # Imports are resolved once and cached: the dispatch path stays plain attribute and dict
        # access, which torch.compile traces without graph breaks.
        self._loaded = {}
        self._triton_missing = None
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            self._triton_missing = f"triton is not installed ({exc})"
        # Where the kernels can run, import them now: the first call of an op may come inside a
        # torch.compile'd region, where an import cannot be traced (fullgraph=True fails on it).
        for op in self._modules:
            self.preload(op)

    def unavailable(self):
        return self._triton_missing

    def _module(self, op):
        module = self._loaded.get(op)
        if module is None:
            module = self._loaded[op] = importlib.import_module(self._modules[op])
        return module

    def preload(self, op):
        """Import the kernel module of ``op`` now if it could run here (CUDA, or the interpreter)."""
        import torch

        if op in self._modules and self._triton_missing is None and (torch.cuda.is_available() or _interpreting()):
            try:
                self._module(op)
            except Exception:  # recorded again, with its reason, by refuse()
                pass

    def refuse(self, op, **inputs):
        if op not in self._modules:
            return f"no Triton kernel for {op}"
        student = inputs["student"]
        if student.device.type != "cuda" and not _interpreting():
            return f"inputs are on {student.device.type}; Triton kernels need CUDA (or TRITON_INTERPRET=1)"
        try:
            module = self._module(op)
        except Exception as exc:
            return f"import of {self._modules[op]} failed: {type(exc).__name__}: {exc}"
        return module.refuse(**inputs)

    def mgd_loss(self, *args, **kwargs):
        return self._module("mgd_loss").mgd_loss(*args, **kwargs)

    def ct_loss(self, *args, **kwargs):
        return self._module("ct_loss").ct_loss(*args, **kwargs)


BACKEND = _TritonBackend()
