"""The demos: a teacher, then students distilled several ways, one table and one picture per task.

    fastkd demo [cls|det|seg] [OPTIONS] [KEY=VALUE ...]      (cls when none is named)
    python -m fastkd.demos.classification | detection | segmentation [OPTIONS] [KEY=VALUE ...]

``classification`` (Fashion-MNIST), ``detection`` (fashion-scenes, RetinaNet), ``segmentation``
(fashion-scenes, PSPNet); ``common`` holds what they share. Their configs are the shipped ones
(:mod:`fastkd.resources`: ``demo/``, ``demo_det/``, ``demo_seg/``). Only :mod:`fastkd.cli` imports this package.
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Sequence

DEMOS = {"cls": "classification", "det": "detection", "seg": "segmentation"}


def pick(argv: Sequence[str]):
    """(demo module name, the rest of argv): a first word naming a demo (``det`` or ``detection``) picks it."""
    argv = list(argv)
    if argv and (argv[0] in DEMOS or argv[0] in DEMOS.values()):
        return DEMOS.get(argv[0], argv[0]), argv[1:]
    return DEMOS["cls"], argv


def main(argv: Optional[List[str]] = None) -> int:
    """``fastkd demo [cls|det|seg] ...``: the chosen demo's ``main`` (its exit status; ``fastkd``'s own error
    handling around it)."""
    import sys

    name, rest = pick(sys.argv[1:] if argv is None else argv)
    return importlib.import_module(f"fastkd.demos.{name}").main(rest)
