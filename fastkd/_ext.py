"""Loader of the compiled extension ``fastkd._C`` (csrc/): never raises, remembers why it failed.

    from fastkd import _ext
    if _ext.is_available():
        torch.ops.fastkd_C.mgd_forward(...)
    else:
        print(_ext.load_error())      # e.g. "fastkd._C is not built (...)"

The extension is optional: ``import fastkd`` works without it and the dispatcher falls back to the
reference backend, saying why csrc was refused. The first failed load warns once. A build from an
older checkout (op schemas changed) or against another torch counts as a failed load.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

# Must equal kAbiVersion in csrc/module.cpp.
ABI_VERSION = 3
REBUILD_HINT = "build it with `pip install --no-build-isolation --no-deps -e .` (or `make setup`)"

_state: dict = {}


def _load() -> Optional[str]:
    try:
        import torch

        importlib.import_module("fastkd._C")  # registers torch.ops.fastkd_C.*
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("fastkd._C", "fastkd"):
            return f"fastkd._C is not built ({exc}); {REBUILD_HINT}"
        return f"fastkd._C failed to load, probably built against another torch ({exc}); {REBUILD_HINT}"
    except Exception as exc:  # a broken .so must not break import fastkd
        return f"fastkd._C failed to load: {type(exc).__name__}: {exc}; {REBUILD_HINT}"
    try:
        abi = int(torch.ops.fastkd_C.abi_version())
    except Exception as exc:
        return f"fastkd._C is stale (no abi_version op: {exc}); re-{REBUILD_HINT}"
    if abi != ABI_VERSION:
        return f"fastkd._C is stale (ABI {abi}, this checkout expects {ABI_VERSION}); re-{REBUILD_HINT}"
    return None


def load_error() -> Optional[str]:
    """Why ``fastkd._C`` cannot be used, or None when it loaded (the load is attempted once)."""
    if "error" not in _state:
        _state["error"] = _load()
        if _state["error"] is not None:
            warnings.warn(f"{_state['error']}; CPU losses fall back to the reference backend",
                          RuntimeWarning, stacklevel=3)
    return _state["error"]


def is_available() -> bool:
    return load_error() is None
