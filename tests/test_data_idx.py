"""IDX parsing against hand-made bytes, and the Fashion-MNIST locator / download / writer."""
import gzip
import hashlib
import os
import struct

import numpy as np
import pytest

from fastkd.data.sources import fashion_mnist
from fastkd.data.sources.idx import IDXError, read_idx, write_idx


def _raw(code, shape, payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


def test_idx_uint8_images_by_hand(tmp_path):
    pixels = bytes(range(24))
    (tmp_path / "a-idx3-ubyte").write_bytes(_raw(0x08, (2, 3, 4), pixels))
    arr = read_idx(tmp_path / "a-idx3-ubyte")
    assert arr.dtype == np.uint8 and arr.shape == (2, 3, 4)
    assert arr[1, 2, 3] == 23 and arr[0, 1, 0] == 4  # C order


def test_idx_big_endian_int32_and_float_gzip(tmp_path):
    ints = struct.pack(">3i", 0x01020304, -2, 7)
    with gzip.open(tmp_path / "l.gz", "wb") as f:
        f.write(_raw(0x0C, (3,), ints))
    assert read_idx(tmp_path / "l.gz").tolist() == [0x01020304, -2, 7]
    (tmp_path / "f").write_bytes(_raw(0x0D, (2,), struct.pack(">2f", 1.5, -0.25)))
    out = read_idx(tmp_path / "f")
    assert out.dtype == np.float32 and out.tolist() == [1.5, -0.25]


@pytest.mark.parametrize("data, match", [
    (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "not an IDX"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "type code"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated header"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x01", "truncated"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x01", "trailing"),
])
def test_idx_malformed_files_name_the_problem(tmp_path, data, match):
    path = tmp_path / "bad"
    path.write_bytes(data)
    with pytest.raises(IDXError, match=match) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_idx_cut_gzip_is_an_idx_error(tmp_path):
    blob = gzip.compress(_raw(0x08, (100,), bytes(100)))
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IDXError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz")


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_write_idx_round_trip(tmp_path, dtype):
    arr = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), arr)


def _fake_fashion(d, n_train=12, n_test=6):
    rng = np.random.default_rng(0)
    os.makedirs(d, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte.gz"), labels)
        data[prefix] = (images, labels)
    return data


def test_fashion_load_checks_and_maps_splits(tmp_path):
    data = _fake_fashion(tmp_path)
    images, labels = fashion_mnist.load("val", str(tmp_path))
    np.testing.assert_array_equal(images, data["t10k"][0])
    assert labels.dtype == np.int64 and labels.tolist() == data["t10k"][1].tolist()
    with pytest.raises(ValueError, match="split"):
        fashion_mnist.load("dev", str(tmp_path))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="6 t10k images but labels"):
        fashion_mnist.load("test", str(tmp_path))


def test_locate_downloads_verifies_and_caches(tmp_path, monkeypatch):
    server = tmp_path / "server"
    _fake_fashion(server)
    sums = {n: hashlib.md5((server / n).read_bytes()).hexdigest() for n in fashion_mnist.FILES}
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    monkeypatch.setattr(fashion_mnist, "FILES", sums)
    monkeypatch.delenv("FASTKD_FASHION_MNIST", raising=False)
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="downloading is disabled"):
        fashion_mnist.locate(str(cache), download_ok=False)
    got = fashion_mnist.locate(str(cache), base_url=server.as_uri() + "/")
    assert got == str(cache) and sorted(os.listdir(cache)) == sorted(sums)
    fashion_mnist.verify(got)
    # Found in the cache now: no download needed even from a dead URL.
    assert fashion_mnist.locate(str(cache), base_url="file:///nonexistent/") == str(cache)


def test_download_rejects_bad_checksum_and_keeps_nothing(tmp_path):
    server = tmp_path / "server"
    _fake_fashion(server)
    name = "train-labels-idx1-ubyte.gz"
    with pytest.raises(fashion_mnist.ChecksumError, match="does not match"):
        fashion_mnist.download(str(tmp_path / "cache"), base_url=server.as_uri() + "/", files={name: "0" * 32})
    assert os.listdir(tmp_path / "cache") == []


def test_debian_package_files_verify_when_installed():
    if not os.path.isdir(fashion_mnist.DEBIAN_DIR):
        pytest.skip("dataset-fashion-mnist is not installed")
    assert fashion_mnist.locate(download_ok=False) == fashion_mnist.DEBIAN_DIR
    fashion_mnist.verify(fashion_mnist.DEBIAN_DIR)
    labels = fashion_mnist.read_idx(os.path.join(fashion_mnist.DEBIAN_DIR, "t10k-labels-idx1-ubyte.gz"))
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10


def test_write_fashion_mnist_beton_exact(tmp_path):
    pytest.importorskip("ffcv")
    from fastkd.data.classification.writers import read_beton, write_fashion_mnist_beton

    data = _fake_fashion(tmp_path / "idx")
    paths = write_fashion_mnist_beton(str(tmp_path / "out"), source_dir=str(tmp_path / "idx"),
                                      num_workers=1, progress=False)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = data[prefix]
        samples = list(read_beton(paths[split]))
        assert len(samples) == len(images)
        for (img, label), ref, ref_label in zip(samples, images, labels):
            assert label == ref_label
            np.testing.assert_array_equal(img, np.repeat(ref[:, :, None], 3, axis=2))
    with pytest.raises(FileExistsError, match="force"):
        write_fashion_mnist_beton(str(tmp_path / "out"), source_dir=str(tmp_path / "idx"))
