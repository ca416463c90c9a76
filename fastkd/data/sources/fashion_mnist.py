"""Fashion-MNIST: locate the four IDX files and load them (:mod:`fastkd.data.classification.writers` writes
them to .beton).

Files come from Debian's ``dataset-fashion-mnist`` package when installed
(/usr/share/datasets/fashion-mnist), else from a cache directory, else they are downloaded from the
dataset's official location and checked against the published MD5 sums before being kept.
Images are stored as RGB (the grey value replicated) so that every model and pipeline in fastkd
takes them unchanged.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from typing import Dict, Optional, Tuple

import numpy as np

from ...atomic import atomic_path
from .idx import read_idx

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# name -> MD5 published in github.com/zalandoresearch/fashion-mnist (README, "Get the Data").
FILES: Dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
SPLITS = {"train": "train", "test": "t10k", "val": "t10k"}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN = (0.2860, 0.2860, 0.2860)  # of the training images, on the 0-1 scale
STD = (0.3530, 0.3530, 0.3530)


class ChecksumError(ValueError):
    """A downloaded file does not match its published checksum."""


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.environ.get("FASTKD_CACHE", os.path.join(base, "fastkd")), "fashion-mnist")


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _has_all(d: str) -> bool:
    return all(os.path.isfile(os.path.join(d, name)) for name in FILES)


def download(cache_dir: str, *, base_url: str = URL, files: Optional[Dict[str, str]] = None,
             timeout: float = 60.0) -> str:
    """Fetch the files missing from ``cache_dir``; each is verified before it is moved in place."""
    files = FILES if files is None else files
    os.makedirs(cache_dir, exist_ok=True)
    for name, md5 in files.items():
        dst = os.path.join(cache_dir, name)
        if os.path.isfile(dst):
            continue
        with atomic_path(dst) as tmp:
            with open(tmp, "wb") as out, urllib.request.urlopen(base_url + name, timeout=timeout) as r:
                shutil.copyfileobj(r, out)
            got = _md5(tmp)
            if got != md5:
                raise ChecksumError(f"{base_url + name}: MD5 {got} does not match the published {md5}; "
                                    "the file was not kept")
    return cache_dir


def locate(cache_dir: Optional[str] = None, *, download_ok: bool = True, base_url: str = URL) -> str:
    """Directory holding the four Fashion-MNIST ``.gz`` IDX files.

    Order: ``$FASTKD_FASHION_MNIST`` if set, the Debian package directory, ``cache_dir`` (default
    ``~/.cache/fastkd/fashion-mnist``), then a verified download into ``cache_dir``.
    """
    candidates = [os.environ.get("FASTKD_FASHION_MNIST", ""), DEBIAN_DIR]
    cache_dir = cache_dir or default_cache_dir()
    for d in candidates + [cache_dir]:
        if d and _has_all(d):
            return d
    if not download_ok:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {DEBIAN_DIR} (apt-get install dataset-fashion-mnist) "
            f"nor in {cache_dir}, and downloading is disabled")
    try:
        return download(cache_dir, base_url=base_url)
    except OSError as e:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {DEBIAN_DIR} nor {cache_dir}, and the download from "
            f"{base_url} failed ({e}); install the Debian package dataset-fashion-mnist or copy the "
            f"four files {sorted(FILES)} into {cache_dir}") from e


def _dpkg_md5s(path: str = "/var/lib/dpkg/info/dataset-fashion-mnist.md5sums") -> Dict[str, str]:
    """MD5s dpkg recorded for the Debian package (it recompresses the .gz files, so their sums
    differ from the published ones; the package archive itself was verified by apt)."""
    try:
        with open(path) as f:
            rows = [line.split() for line in f if line.strip()]
    except OSError:
        return {}
    return {"/" + name: md5 for md5, name in rows}


def verify(directory: str) -> None:
    """Check the four files in ``directory`` against the published MD5 sums, or against dpkg's
    record when the Debian package installed them; ChecksumError names the first mismatch."""
    dpkg = _dpkg_md5s()
    for name, md5 in FILES.items():
        path = os.path.join(directory, name)
        got = _md5(path)
        if got != md5 and got != dpkg.get(os.path.abspath(path)):
            raise ChecksumError(f"{path}: MD5 {got} matches neither the published {md5} nor the "
                                "Debian package's record")


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise FileNotFoundError(f"{os.path.join(directory, stem)}(.gz) not found")


def is_idx_dir(directory: str) -> bool:
    try:
        _find(directory, "train-images-idx3-ubyte")
        return True
    except FileNotFoundError:
        return False


def load(split: str, directory: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels int64 [N]) of ``split`` ('train', 'test' or 'val' = test)."""
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split {split!r} is not one of {sorted(SPLITS)}")
    directory = directory or locate()
    prefix = SPLITS[split]
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{directory}: {prefix} images should be uint8 [N,H,W], got "
                         f"{images.dtype}{list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{directory}: {len(images)} {prefix} images but labels of shape {labels.shape}")
    return images, labels.astype(np.int64)
