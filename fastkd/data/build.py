"""``build_loader`` / ``build_loaders``: config -> loaders (see the contract in ``fastkd.data``)."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from collections.abc import Mapping
from typing import Optional, Sequence, Tuple

import torch

from . import fashion_mnist
from .transforms import (DEFAULT_CENTER_RATIO, DEFAULT_RATIO, DEFAULT_SCALE, IMAGENET_MEAN, IMAGENET_STD,
                         ResolutionSchedule)

SOURCES = ("ffcv", "torch", "auto")
_SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val")}


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


def _names(split: str) -> Sequence[str]:
    return _SPLIT_NAMES.get(split, (split,))


def resolve_beton(path: str, split: str) -> str:
    """``path`` itself when it is a file, else ``path/<split>.beton`` (val also finds test.beton)."""
    if os.path.isfile(path):
        return path
    tried = [os.path.join(path, f"{n}.beton") for n in _names(split)]
    for candidate in tried:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no .beton for split {split!r}: tried {tried} "
                            "(write them with `fastkd data write`)")


def _is_fashion(path: str) -> bool:
    return path.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist") or \
        (os.path.isdir(path) and fashion_mnist.is_idx_dir(path))


def make_source(path: str, split: str, on_corrupt: str = "error"):
    """Fallback source for ``path``: 'fashion-mnist' / an IDX directory, or an ImageFolder tree
    (``path/<split>`` when it exists, else ``path``).  on_corrupt='skip' checks every image header
    first and leaves out (with a warning naming them) the files PIL cannot identify; 'error' lets
    a bad file fail the batch that reads it, naming the file."""
    from .writers import ArraySource, ImageFolderSource
    from .imagefolder import scan

    if _is_fashion(path):
        directory = None if not os.path.isdir(path) else path
        images, labels = fashion_mnist.load("test" if split != "train" else "train", directory)
        return ArraySource(images, labels, name=f"fashion-mnist/{split}", classes=fashion_mnist.CLASSES)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset path {path!r} is neither a directory nor 'fashion-mnist'")
    root = next((os.path.join(path, n) for n in _names(split) if os.path.isdir(os.path.join(path, n))), path)
    index = scan(root)
    if on_corrupt == "skip":
        index = without_unreadable(index)
    elif on_corrupt != "error":
        raise ValueError(f"on_corrupt {on_corrupt!r} is not one of ('skip', 'error')")
    return ImageFolderSource(index)


def without_unreadable(index):
    import dataclasses as dc
    import warnings

    from .imagefolder import CorruptImageError, probe

    keep, bad = [], []
    for sample in index.samples:
        try:
            probe(sample[0])
            keep.append(sample)
        except CorruptImageError as e:
            bad.append(e)
    if bad:
        names = ", ".join(e.path for e in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"skipping {len(bad)} unreadable image(s) under {index.root}: {names}", stacklevel=3)
    return dc.replace(index, samples=tuple(keep))


def _is_fashion_dataset(source: str, path: str) -> bool:
    if source == "torch":
        fashion = _is_fashion(path)
    else:
        from .ffcv_loader import sidecar  # only reached when FFCV imports

        fashion = tuple(sidecar(path).get("classes", ())) == fashion_mnist.CLASSES
    return fashion


def _distributed_defaults(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_loader(split: str, *, source: str = "auto", path: str, batch_size: int, num_workers: int = 4,
                 image_size: int = 224, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, device="cpu", channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, distributed: bool = False, rank: Optional[int] = None,
                 world_size: Optional[int] = None, seed: int = 0, drop_last: Optional[bool] = None,
                 train: Optional[bool] = None, shuffle: Optional[bool] = None,
                 resolution_schedule=None, scale: Sequence[float] = DEFAULT_SCALE,
                 ratio: Sequence[float] = DEFAULT_RATIO, flip: bool = True,
                 center_ratio: Optional[float] = None, os_cache: bool = True, batches_ahead: int = 3,
                 on_corrupt: str = "error"):
    """One split's loader; see ``fastkd.data`` for the contract.

    source: 'ffcv' (.beton), 'torch' (ImageFolder / Fashion-MNIST IDX via a PyTorch DataLoader) or
    'auto' (ffcv when ``path`` resolves to a .beton and FFCV imports, else torch).
    train: augment (RandomResizedCrop + flip) and shuffle; default ``split == 'train'``.
    drop_last: default ``train``.  resolution_schedule: {min_res, max_res, start_ramp, end_ramp[, step]}
    (train only).  mean/std: 0-1 scale; default Fashion-MNIST's or ImageNet's statistics.
    center_ratio: eval crop side / shorter image side; default 1 for Fashion-MNIST, else 224/256.
    on_corrupt: torch source only ('error' or 'skip', see :func:`make_source`); .beton files were
    checked when written.
    """
    if source not in SOURCES:
        raise ValueError(f"data source {source!r} is not one of {SOURCES}")
    train = split == "train" if train is None else bool(train)
    drop_last = train if drop_last is None else bool(drop_last)
    if distributed:
        rank, world_size = _distributed_defaults(rank, world_size)
    else:
        rank, world_size = 0, 1
    if source == "auto":
        ok, _ = ffcv_available()
        try:
            path_ffcv = resolve_beton(path, split) if ok else None
        except FileNotFoundError:
            path_ffcv = None
        source, path = ("ffcv", path_ffcv) if path_ffcv else ("torch", path)
    elif source == "ffcv":
        ok, why = ffcv_available()
        if not ok:
            raise ImportError(f"data source 'ffcv' but FFCV does not import ({why}); install it "
                              "(`make setup`) or set data.source: torch")
        path = resolve_beton(path, split)
    if mean is None or std is None or center_ratio is None:
        fashion = _is_fashion_dataset(source, path)
        mean = mean or (fashion_mnist.MEAN if fashion else IMAGENET_MEAN)
        std = std or (fashion_mnist.STD if fashion else IMAGENET_STD)
        if center_ratio is None:  # 28 px images: evaluate on the whole image
            center_ratio = 1.0 if fashion else DEFAULT_CENTER_RATIO
    schedule = ResolutionSchedule.from_any(resolution_schedule) if train else None
    common = dict(train=train, batch_size=batch_size, num_workers=num_workers, image_size=image_size,
                  mean=mean, std=std, device=device, channels_last=channels_last, dtype=dtype, seed=seed,
                  rank=rank, world_size=world_size, drop_last=drop_last, shuffle=shuffle,
                  resolution=schedule, scale=scale, ratio=ratio, flip=flip, center_ratio=center_ratio)
    if source == "ffcv":
        from .ffcv_loader import FFCVLoader

        loader = FFCVLoader(path, os_cache=os_cache, batches_ahead=batches_ahead, **common)
    else:
        from .fallback import TorchLoader

        loader = TorchLoader(make_source(path, split, on_corrupt), **common)
    loader.normalization = (tuple(float(m) for m in mean), tuple(float(v) for v in std))
    loader.path = path
    return loader


def check_same_normalization(train, val) -> None:
    """A model evaluated on differently normalised images than it trained on is silently wrong: refuse it.
    (Default statistics are chosen per file, from its sidecar's class list: a val .beton whose sidecar is
    missing gets ImageNet's while its train split gets Fashion-MNIST's.)"""
    tn, vn = getattr(train, "normalization", None), getattr(val, "normalization", None)
    if tn is None or vn is None or tn == vn:
        return
    raise ValueError(f"the train split ({getattr(train, 'path', '?')}) and the val split "
                     f"({getattr(val, 'path', '?')}) would be normalised differently (mean/std {tn} vs {vn}): "
                     "the default statistics follow each file's sidecar (<file>.json, its class list); restore "
                     "the missing or different sidecar, or set data.mean and data.std")


_LOADER_KEYS = set(inspect.signature(build_loader).parameters) - {"split"}
_EXTRA_KEYS = {"val_path", "val_batch_size", "train_split", "val_split"}


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    return dict(vars(cfg))


def build_loaders(cfg=None, **overrides):
    """(train_loader, val_loader) from a config (mapping, dataclass or namespace) plus overrides.

    Keys: every ``build_loader`` argument, and ``val_path`` (default ``path``), ``val_batch_size``
    (default ``batch_size``), ``train_split`` ('train'), ``val_split`` ('val').  Keys of the
    config object that no loader uses are ignored (a run config carries other sources' options);
    an unknown *override* is an error naming the closest known key.
    """
    known = _LOADER_KEYS | _EXTRA_KEYS
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"build_loaders: unknown option {key!r}{hint}")
    opts = {k: v for k, v in _as_dict(cfg).items() if k in known}
    opts.update(overrides)
    if opts.get("path") is None:
        raise ValueError("build_loaders: data path is not set")
    val_path = opts.pop("val_path", None) or opts["path"]
    val_batch_size = opts.pop("val_batch_size", None) or opts.get("batch_size")
    train_split, val_split = opts.pop("train_split", "train"), opts.pop("val_split", "val")
    train_loader = build_loader(train_split, **opts)
    val_opts = {**opts, "path": val_path, "batch_size": val_batch_size, "drop_last": False, "train": False,
                "shuffle": False, "resolution_schedule": None}
    val_loader = build_loader(val_split, **val_opts)
    check_same_normalization(train_loader, val_loader)
    return train_loader, val_loader
