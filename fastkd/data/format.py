"""The on-disk format every task's data shares: a ``.beton`` (FFCV's file) with its ``<file>.json`` sidecar
(what was written, by which options; the classes or the category map), where a split's file lies, and
whether FFCV imports here. Imports neither FFCV nor torch."""
from __future__ import annotations

import json
import os
from typing import Sequence, Tuple

SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val")}


def ffcv_available() -> Tuple[bool, str]:
    """(importable, why not)."""
    try:
        from .base import ffcv_import

        ffcv_import()
        import ffcv  # noqa: F401
        from ffcv.loader import Loader  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure (missing libs, ABI) means "use torch"
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def split_names(split: str) -> Sequence[str]:
    """File and folder names a split may have (val also finds test, and test val)."""
    return SPLIT_NAMES.get(split, (split,))


def resolve_beton(path: str, split: str, what: str = "") -> str:
    """``path`` itself when it is a file, else ``path/<split>.beton`` (val also finds test.beton)."""
    if os.path.isfile(path):
        return path
    tried = [os.path.join(path, f"{n}.beton") for n in split_names(split)]
    for candidate in tried:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no {what}.beton for split {split!r}: tried {tried} "
                            "(write them with `fastkd data write`)")


def sidecar(path: str) -> dict:
    """The ``<file>.json`` written next to a .beton by fastkd's writers ({} when absent)."""
    try:
        with open(path + ".json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
