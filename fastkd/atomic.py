"""Atomic file writes: a file appears under its final name complete, or not at all.

Every write goes to a temporary name in the target's own folder (``<name>.tmp.<random>``: the same file
system, so the rename is atomic; ``.tmp.`` in the name marks a leftover of a killed process), is flushed
to disk (fsync), and is renamed over the target (``os.replace``); an error on the way removes the
temporary file and leaves the old target as it was.

    with atomic_write("summary.json") as f:      # a file object (text, or mode="wb")
        json.dump(rows, f)
    with atomic_path("model.pt") as tmp:         # a path, for writers that want a file name
        torch.save(state, tmp)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

TMP_MARK = ".tmp."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's own files are private (0600)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str, *, directory: bool = False) -> str:
    """A new empty file (or folder) beside ``path`` named ``<name>.tmp.<random>``."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if directory:
        return tempfile.mkdtemp(prefix=name + TMP_MARK, dir=folder)
    fd, tmp = tempfile.mkstemp(prefix=name + TMP_MARK, dir=folder)
    try:
        os.fchmod(fd, _FILE_MODE)
    finally:
        os.close(fd)
    return tmp


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path``; write the file there (by name). On a normal exit it is
    synced and renamed to ``path``; on an exception it is removed and ``path`` is untouched."""
    tmp = temp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[Any]:
    """``open(path, mode)`` made atomic (see the module docstring); ``mode`` is "w" or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yields a temporary folder beside ``path``; on a normal exit it replaces ``path`` (which must not
    exist, or be a folder: it is removed first), on an exception it is removed."""
    tmp = temp_name(path, directory=True)
    try:
        yield tmp
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json(path: str, obj, **dump_kwargs) -> None:
    """``json.dump(obj)`` to ``path`` atomically (indent=1 unless given)."""
    dump_kwargs.setdefault("indent", 1)
    with atomic_write(path) as f:
        json.dump(obj, f, **dump_kwargs)
