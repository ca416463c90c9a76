"""IDX files (the MNIST / Fashion-MNIST container), plain or gzip-compressed.

Layout (big-endian): two zero bytes, a type code, the number of dimensions D, then D uint32
sizes, then the data in C order.  Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64.
"""
from __future__ import annotations

import gzip
import os
import struct
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]

_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
          0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {np.dtype(v).newbyteorder("=").str[1:]: k for k, v in _TYPES.items()}


class IDXError(ValueError):
    """An IDX file is malformed (bad magic, truncated, trailing bytes)."""


def _open(path: PathLike):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzip detected from its magic bytes) -> array in native byte order."""
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) / EOFError when cut
        raise IDXError(f"{path}: cannot read IDX data ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IDXError(f"{path}: not an IDX file (magic bytes {data[:4].hex() or 'missing'})")
    code, ndim = data[2], data[3]
    if code not in _TYPES:
        raise IDXError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated header ({len(data)} bytes, {ndim} dims)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _TYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise IDXError(f"{path}: {what}: {len(data)} bytes, expected {expected} for shape "
                       f"{tuple(shape)} of {dtype.name}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: PathLike, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as IDX (gzip when ``compress`` or when the name ends in .gz)."""
    array = np.asarray(array)
    key = array.dtype.newbyteorder("=").str[1:]
    if key not in _CODES:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    code = _CODES[key]
    payload = (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
               + np.ascontiguousarray(array, dtype=_TYPES[code]).tobytes())
    if compress is None:
        compress = str(path).endswith(".gz")
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)
