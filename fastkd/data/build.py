"""One loader builder for every task: ``build_loader(task, data, split, *, batch_size, rank, world_size, seed,
device, grad_accum, dtype, channels_last)``, dispatched to the task's data folder.

Each task folder of ``fastkd.data`` has a ``build_loader(data, split, *, batch_size, rank=0, world_size=1, seed=0,
device="cpu", grad_accum=1, dtype=torch.float32, channels_last=False)`` with this very signature: ``data`` is a
:class:`fastkd.config.DataConfig` (``source``, ``path`` / ``val_path``, ``image_size``, ``mean`` / ``std``,
``num_workers``, the task's own options in ``kwargs``); ``split`` 'train' gives the augmented, shuffled,
drop_last loader, any other split the evaluation loader (every sample once over all ranks). The loader follows
the position contract of :class:`fastkd.data.base.DataPosition` (``len``, ``set_epoch``, ``skip_batches``,
``state_dict`` / ``load_state_dict``). A task folder may also have ``check_pair(train, val)`` (raises
ValueError when the two cannot be used together) and ``VAL_BATCH_SIZE`` (the val batch when
``data.kwargs.val_batch_size`` is not set; None: the train batch).

The task folders are named here by module path and imported on use: the core imports no task's data.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Optional, Tuple

LOADERS = {
    "classification": "fastkd.data.classification.build",
    "detection": "fastkd.data.detection.loader",
    "segmentation": "fastkd.data.segmentation.loader",
}


def loader_module(task: str):
    """The module of ``task``'s loader builder (ValueError naming the task when there is none)."""
    if task not in LOADERS:
        close = difflib.get_close_matches(str(task), list(LOADERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"no data loaders for task {task!r}{hint}; known: {', '.join(LOADERS)}")
    return importlib.import_module(LOADERS[task])


def build_loader(task: str, data, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device="cpu", grad_accum: int = 1, dtype=None, channels_last: bool = False):
    """``task``'s loader of ``split`` for this rank (see the module docstring)."""
    extra = {} if dtype is None else {"dtype": dtype}
    return loader_module(task).build_loader(data, split, batch_size=batch_size, rank=rank, world_size=world_size,
                                            seed=seed, device=device, grad_accum=grad_accum,
                                            channels_last=channels_last, **extra)


def build_loaders(task: str, data, *, batch_size: int, val_batch_size: Optional[int] = None, rank: int = 0,
                  world_size: int = 1, seed: int = 0, device="cpu", grad_accum: int = 1, dtype=None,
                  channels_last: bool = False) -> Tuple[object, object]:
    """(train, val) loaders of this rank; the val batch is ``val_batch_size``, else ``data.kwargs.val_batch_size``,
    else the task's default (``VAL_BATCH_SIZE``), else ``batch_size``."""
    module = loader_module(task)
    if val_batch_size is None:
        val_batch_size = (data.kwargs or {}).get("val_batch_size") or getattr(module, "VAL_BATCH_SIZE", None)
    common = dict(rank=rank, world_size=world_size, seed=seed, device=device, grad_accum=grad_accum,
                  channels_last=channels_last, **({} if dtype is None else {"dtype": dtype}))
    train = module.build_loader(data, "train", batch_size=batch_size, **common)
    val = module.build_loader(data, "val", batch_size=int(val_batch_size or batch_size), **common)
    check = getattr(module, "check_pair", None)
    if check is not None:
        check(train, val)
    return train, val
