"""The files fastkd ships beside its code: the repository's ``configs/`` (recipes, the demos' configs, the
DeepSpeed presets), found wherever fastkd runs from.

- an installed wheel carries them as package data, ``fastkd/configs/`` (``setup.py`` maps ``configs/``
  there), read through ``importlib.resources``;
- a source checkout (``PYTHONPATH``, ``pip install -e .``) has no ``fastkd/configs/``: its own ``configs/``
  beside ``fastkd/`` is read instead.

    config_path("demo/mgd.yaml")                  # an existing file of the shipped configs
    locate("configs/deepspeed/zero2.json")        # a path as a config writes it (see locate)
"""
from __future__ import annotations

import importlib.resources
import os
from typing import Optional

from .errors import ConfigError

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def checkout_root() -> Optional[str]:
    """The source checkout fastkd runs from (the folder holding ``setup.py``, ``configs/`` and ``fastkd/``),
    or None when fastkd is an installed package."""
    root = os.path.dirname(PACKAGE_DIR)
    ok = os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "configs"))
    return root if ok else None


def configs_dir() -> str:
    """The folder of the shipped configs: the installed package's, else the source checkout's."""
    shipped = importlib.resources.files("fastkd").joinpath("configs")
    if shipped.is_dir():
        return str(shipped)  # a folder on disk: wheels are installed unzipped
    root = checkout_root()
    if root is None:
        raise ConfigError(f"fastkd's configs are missing: {PACKAGE_DIR} has no configs/ and is not a source "
                          "checkout (reinstall fastkd)")
    return os.path.join(root, "configs")


def config_path(name: str) -> str:
    """The shipped config ``name`` (relative to ``configs/``, e.g. ``demo/mgd.yaml``); ConfigError naming
    the folder when it is not there."""
    folder = configs_dir()
    path = os.path.join(folder, *name.split("/"))
    if not os.path.isfile(path):
        raise ConfigError(f"no config {name!r} among fastkd's configs ({folder})")
    return path


def locate(path: str) -> str:
    """A file path as a config or a user writes it: ``path`` itself when it exists (absolute, or relative to
    the working directory); else a relative ``configs/...`` path names the shipped config of that name, so
    ``configs/deepspeed/zero2.json`` works from any directory; else ``path`` unchanged (the caller says it
    was not found)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) > 1 and parts[0] == "configs":
        shipped = os.path.join(configs_dir(), *parts[1:])
        if os.path.exists(shipped):
            return shipped
    return path
