"""The writer core every task's ``.beton`` goes through: fields -> FFCV's ``DatasetWriter`` -> one file,
written atomically with its ``<file>.json`` sidecar, with or without progress bars.

    with beton_target(out_path, force=force) as target:     # refuses an existing file unless force
        failures = write_fields(target.tmp, fields, samples, placeholder=..., page=..., progress=...)
        ...                                                  # the task decides what a failure means
        target.sidecar = {...}                               # written first, then the .beton renamed

A sample whose ``samples[i]`` raises must not raise inside FFCV's writer processes (FFCV waits forever
for it): :func:`write_fields` records it (``samples.describe(i)`` and the reason) and writes
``placeholder`` in its place; the caller stops or writes again without it. An exception inside the
``with`` leaves neither file under its final name (:func:`fastkd.atomic.atomic_path`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Union

import numpy as np

from ..atomic import atomic_path, write_json

MIN_PAGE = 1 << 21  # FFCV's smallest page (2 MiB)


@dataclass
class Failure:
    """Sample ``index`` could not be read: ``where`` (its file) and why."""
    index: int
    where: str
    reason: str


def page_size(sample_bytes: int, smallest: int = MIN_PAGE) -> int:
    """The FFCV page (a power of two from ``smallest`` on) that holds a sample of ``sample_bytes``."""
    page = smallest
    while page < sample_bytes:
        page *= 2
    return page


def cap_workers(num_workers: Optional[int], num_samples: Optional[int] = None) -> int:
    """Writer processes: ``num_workers`` (default: every CPU this process may use), at most the CPUs and the
    samples."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(1, min(cpus, num_workers if num_workers and num_workers > 0 else cpus))
    return max(1, min(n, num_samples)) if num_samples is not None else n


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """``iterable`` with a tqdm bar when ``enabled`` (``--no-progress`` turns it off)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img")


@contextlib.contextmanager
def ffcv_progress(enabled: bool):
    """FFCV's ``DatasetWriter`` always draws a tqdm bar (it has no switch): with ``enabled`` False, the bar
    its module draws inside this block is a disabled one (the writer's ``tqdm`` name, restored after)."""
    if enabled:
        yield
        return
    import functools

    from .base import ffcv_import

    ffcv_import()
    from ffcv import writer

    drawn = writer.tqdm
    writer.tqdm = functools.partial(drawn, disable=True)
    try:
        yield
    finally:
        writer.tqdm = drawn


class _Reported:
    """``samples`` for FFCV's writer processes: a sample that raises is written down in ``report_dir`` and
    replaced by the placeholder (an exception there would hang the writer)."""

    def __init__(self, samples, report_dir: str, placeholder):
        self.samples, self.report_dir, self.placeholder = samples, report_dir, placeholder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            return self.samples[i]
        except Exception as e:  # noqa: BLE001 - any failure becomes a report, never a hang
            reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
            with open(os.path.join(self.report_dir, str(int(i))), "w") as f:
                f.write(f"{self.samples.describe(i)}\n{reason}")
            return self.placeholder(i) if callable(self.placeholder) else self.placeholder


def write_fields(path: str, fields: dict, samples, *, placeholder: Union[tuple, Callable[[int], tuple]],
                 indices: Optional[np.ndarray] = None, num_workers: Optional[int] = None, page: int = MIN_PAGE,
                 chunksize: int = 100, progress: bool = True) -> List[Failure]:
    """One pass of FFCV's writer: ``samples[i]`` (a tuple in ``fields`` order) for every ``i`` of
    ``indices`` (default all) into ``path``; returns the samples that failed, by index."""
    from .base import ffcv_import

    ffcv_import()
    from ffcv.writer import DatasetWriter

    n = len(samples) if indices is None else len(indices)
    report_dir = tempfile.mkdtemp(prefix="fastkd-write-")
    try:
        writer = DatasetWriter(path, fields, num_workers=cap_workers(num_workers, -(-n // chunksize)),
                               page_size=page)
        with ffcv_progress(progress):
            writer.from_indexed_dataset(_Reported(samples, report_dir, placeholder), indices=indices,
                                        chunksize=chunksize)
        failures = []
        for name in sorted(os.listdir(report_dir), key=int):
            with open(os.path.join(report_dir, name)) as f:
                where, _, reason = f.read().partition("\n")
            failures.append(Failure(int(name), where, reason))
        return failures
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)


class Target:
    """A .beton being written: FFCV writes ``tmp``; set ``sidecar`` (a dict) before the ``with`` ends."""

    def __init__(self, path: str, tmp: str):
        self.path, self.tmp, self.sidecar = path, tmp, None


@contextlib.contextmanager
def beton_target(out_path: str, *, force: bool = False) -> Iterator[Target]:
    """A temporary file beside ``out_path``; at the end of the block the sidecar ``out_path + '.json'`` is
    written (atomically) and then the file renamed to ``out_path``: a .beton under its final name is always
    complete and has its sidecar. Refuses an existing ``out_path`` unless ``force``."""
    if os.path.exists(out_path) and not force:
        raise FileExistsError(f"{out_path} exists; refusing to overwrite it (use --force / force=True)")
    with atomic_path(out_path) as tmp:
        target = Target(out_path, tmp)
        yield target
        if target.sidecar is None:
            raise RuntimeError(f"{out_path}: the writer set no sidecar")
        write_json(out_path + ".json", target.sidecar)
