"""The reference backend: pure PyTorch, every device and dtype (see reference.py)."""
from __future__ import annotations

from . import reference


class _ReferenceBackend:
    name = "reference"

    def unavailable(self):
        return None

    def refuse(self, op, **inputs):
        return None

    def mgd_loss(self, *args, **kwargs):
        return reference.mgd_loss(*args, **kwargs)

    def ct_loss(self, *args, **kwargs):
        return reference.ct_loss(*args, **kwargs)

    def kd_loss(self, *args, **kwargs):
        return reference.kd_loss(*args, **kwargs)


BACKEND = _ReferenceBackend()
