"""Checks made before any expensive set-up: a bad input ends in one message naming the file and the cause.

``check(cfg)`` runs in every process before the process group, the models and the loaders exist: the
run directory (a file? not writable?), every ``.beton`` the config points at (truncated? not a .beton?)
and what the task checks itself (``Task.preflight``: e.g. the ground truth detection evaluates against).
``check_data(cfg)`` is the part without the run directory (``fastkd eval``).
"""
from __future__ import annotations

import os
from typing import List, Optional

from ..config import Config, ConfigError, DataConfig


def check(cfg: Config) -> None:
    check_run_dir(cfg.run_dir)
    check_data(cfg)


def check_data(cfg: Config) -> None:
    for path in beton_files(cfg.data):
        check_beton(path)
    from ..tasks import build_task
    build_task(cfg).preflight()


def check_run_dir(run_dir: str) -> None:
    """``run_dir`` is (or can become) a directory this process can write into, as can its existing files."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run_dir {run_dir} exists and is not a directory")
    where = run_dir
    while not os.path.exists(where):  # the nearest existing ancestor must let us create it
        parent = os.path.dirname(os.path.abspath(where))
        if parent == os.path.abspath(where):
            break
        where = parent
    if not os.path.isdir(where):
        raise ConfigError(f"run_dir {run_dir}: {where} is not a directory")
    probe = os.path.join(where, f".fastkd-probe.{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"run_dir {run_dir} is not writable: {where}: {os.strerror(exc.errno or 0)}") from None
    for name in ("metrics.jsonl", "checkpoints"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path) and not os.access(path, os.W_OK | (os.X_OK if os.path.isdir(path) else 0)):
            raise ConfigError(f"run_dir {run_dir}: {path} is not writable")


def beton_files(data: DataConfig) -> List[str]:
    """The .beton files a data config reads (a file itself, or those in a directory)."""
    out: List[str] = []
    for path in (data.path, data.val_path):
        if path is None or not os.path.exists(path):
            continue
        if os.path.isfile(path) and path.endswith(".beton"):
            out.append(path)
        elif os.path.isdir(path):
            out.extend(os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".beton"))
    return sorted(set(out))


def check_beton(path: str) -> None:
    """Structure of an FFCV file: header, version, and every table and sample inside the file's length."""
    problem = beton_problem(path)
    if problem:
        raise ConfigError(f"{path}: {problem}")


def beton_problem(path: str) -> Optional[str]:
    import numpy as np
    from ..data.base import ffcv_import

    ffcv_import()
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    size = os.path.getsize(path)
    if size < HeaderType.itemsize:
        return f"not an FFCV .beton file (only {size} bytes)"
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        return (f"not an FFCV .beton file, or written by another FFCV version (format version "
                f"{int(header['version'])}, expected {CURRENT_VERSION})")
    table_at, entry = int(header["alloc_table_ptr"]), ALLOC_TABLE_TYPE.itemsize
    if table_at > size or (size - table_at) % entry:
        return f"truncated or corrupt (allocation table at byte {table_at}, file is {size} bytes)"
    try:
        from ffcv.reader import Reader
        reader = Reader(path)
    except (AssertionError, ValueError, TypeError, KeyError, IndexError) as exc:
        return f"corrupt FFCV header ({type(exc).__name__}: {exc})"
    table = reader.alloc_table
    if len(table) == 0 and reader.num_samples:
        return "truncated: the allocation table is empty"
    end = int((table["ptr"] + table["size"]).max()) if len(table) else 0
    if end > table_at:
        return f"truncated or corrupt (sample data reaches byte {end}, past the allocation table at {table_at})"
    if len(reader.metadata) != reader.num_samples:
        return f"truncated: {len(reader.metadata)} of {reader.num_samples} samples described"
    return None
