"""FFCV writer -> reader -> loader, on data the tests write themselves.

Kept small: every FFCV loader JIT-compiles its pipeline (a few seconds each), so loaders are built
once per module and shared.
"""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")
from PIL import Image  # noqa: E402

from fastkd.data.classification.build import make_loader  # noqa: E402
from fastkd.data.classification.imagefolder import CorruptImageError  # noqa: E402
from fastkd.data.classification.writers import read_beton, write_beton, write_imagefolder_beton  # noqa: E402
from fastkd.data.classification.imagefolder import load_rgb, scan  # noqa: E402
from fastkd.data.classification.writers import ArraySource  # noqa: E402

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
# numba finalisers of FFCV's recompiled pipelines raise KeyError at garbage collection (harmless).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _make_folder(root, truncated=True, garbage=True):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(root / c)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (20 + k, 30, 3), dtype=np.uint8)).save(root / "cat" / f"{k}.png")
        Image.fromarray(rng.integers(0, 256, (24, 18 + k, 3), dtype=np.uint8)).save(root / "dog" / f"{k}.jpg",
                                                                                      quality=95)
    Image.fromarray(rng.integers(0, 256, (17, 19), dtype=np.uint8)).save(root / "cat" / "grey.png")
    Image.new("CMYK", (21, 15), (10, 200, 30, 40)).save(root / "dog" / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(root / "dog" / "alpha.png")
    if garbage:
        (root / "dog" / "garbage.jpg").write_bytes(b"this is not an image")
    if truncated:  # header intact, data cut: only a full decode finds it
        blob = (root / "dog" / "0.jpg").read_bytes()
        (root / "cat" / "truncated.jpg").write_bytes(blob[: len(blob) // 2])
    (root / "cat" / "notes.txt").write_text("not an image extension: ignored")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp("if") / "train")


@pytest.fixture(scope="module")
def raw_beton(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("b") / "train.beton")
    report = write_imagefolder_beton(str(folder), out, write_mode="raw", num_workers=2, progress=False)
    return out, report


def test_raw_round_trip_is_exact_and_corrupt_files_are_skipped(folder, raw_beton):
    out, report = raw_beton
    good = [(p, lab) for p, lab in scan(str(folder)).samples
            if not p.endswith(("garbage.jpg", "truncated.jpg"))]
    assert report.num_samples == len(good) == 11
    assert sorted(os.path.basename(p) for p, _ in report.skipped) == ["garbage.jpg", "truncated.jpg"]
    assert report.classes == ("cat", "dog")
    samples = list(read_beton(out))
    assert len(samples) == len(good)
    for (img, label), (path, ref_label) in zip(samples, good):
        assert label == ref_label, path
        np.testing.assert_array_equal(img, load_rgb(path), err_msg=path)
    grey = next(i for i, (p, _) in enumerate(good) if p.endswith("grey.png"))
    img = samples[grey][0]
    assert img.shape == (17, 19, 3) and (img[..., 0] == img[..., 2]).all()
    cmyk = next(i for i, (p, _) in enumerate(good) if p.endswith("cmyk.jpg"))
    np.testing.assert_array_equal(samples[cmyk][0], np.asarray(Image.open(folder / "dog" / "cmyk.jpg").convert("RGB")))


def test_refuses_to_overwrite_without_force(folder, raw_beton, tmp_path):
    out, _ = raw_beton
    before = os.path.getmtime(out)
    with pytest.raises(FileExistsError, match="force"):
        write_imagefolder_beton(str(folder), out, write_mode="raw")
    assert os.path.getmtime(out) == before


def test_stop_policy_names_the_truncated_file_and_writes_nothing(tmp_path):
    root = _make_folder(tmp_path / "t", garbage=False)
    out = tmp_path / "x.beton"
    with pytest.raises(CorruptImageError, match="truncated.jpg"):
        write_imagefolder_beton(str(root), str(out), write_mode="raw", on_corrupt="error", num_workers=1,
                                progress=False)
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_jpeg_mode_with_max_resolution(tmp_path):
    img = np.zeros((400, 300, 3), np.uint8)
    img[:, :150] = (200, 40, 90)
    src = ArraySource(img[None].repeat(3, 0), np.array([0, 1, 2]))
    out = str(tmp_path / "j.beton")
    write_beton(src, out, write_mode="jpg", jpeg_quality=95, max_resolution=100, num_workers=1, progress=False)
    (a, la), *_ = list(read_beton(out))
    assert a.shape == (100, 75, 3) and la == 0
    assert np.abs(a[:, :30].astype(int) - (200, 40, 90)).max() <= 6
    write_beton(src, out, write_mode="raw", max_resolution=100, num_workers=1, progress=False, force=True)
    assert next(read_beton(out))[0].shape == (100, 75, 3)


@pytest.fixture(scope="module")
def id_beton(tmp_path_factory):
    """37 square images whose label is their index and whose pixels encode it."""
    n = 37
    images = np.zeros((n, 8, 8, 3), np.uint8)
    images[..., 0] = np.arange(n)[:, None, None] * 6
    images[..., 1] = 255 - np.arange(n)[:, None, None] * 3
    images[..., 2] = 17
    out = str(tmp_path_factory.mktemp("id") / "val.beton")
    write_beton(ArraySource(images, np.arange(n)), out, write_mode="raw", num_workers=1, progress=False)
    return out, images


def _ids(loader):
    return [labels.clone() for _, labels in loader]


def test_val_loader_pixels_shards_and_low_precision(id_beton):
    path, images = id_beton
    common = dict(source="ffcv", path=path, batch_size=5, num_workers=2, image_size=8, mean=MEAN, std=STD,
                  center_ratio=1.0, distributed=True, world_size=2)
    loaders = [make_loader("val", rank=r, **common) for r in range(2)]
    loaders.append(make_loader("val", rank=0, **{**common, "world_size": 1, "distributed": False,
                                                  "dtype": torch.bfloat16, "channels_last": True}))
    seen = []
    for rank, loader in enumerate(loaders[:2]):
        assert loader.backend == "ffcv" and len(loader) == -(-len(range(rank, 37, 2)) // 5)
        for x, y in loader:
            assert x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
            ref = (torch.from_numpy(images[y.numpy()]).permute(0, 3, 1, 2).double() / 255
                   - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
            torch.testing.assert_close(x.double(), ref, atol=1e-5, rtol=0)
            seen.append(y.clone())
        assert loader.state_dict()["epoch"] == 1
    ids = torch.cat(seen).tolist()
    assert sorted(ids) == list(range(37))  # disjoint shards covering the set, eval keeps every sample
    x, y = next(iter(loaders[2]))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    assert y.tolist() == [0, 1, 2, 3, 4]  # eval order is the file order
    ref = (torch.from_numpy(images[:5]).permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x.float(), ref, atol=0.05, rtol=0.01)


def test_train_loader_order_shards_resume_and_resolution(id_beton):
    path, _ = id_beton
    common = dict(source="ffcv", path=path, batch_size=4, num_workers=2, image_size=8, mean=MEAN, std=STD,
                  seed=11, distributed=True, world_size=2,
                  resolution_schedule={"min_res": 8, "max_res": 16, "start_ramp": 1, "end_ramp": 2, "step": 8})
    r0, r1 = (make_loader("train", rank=r, **common) for r in range(2))
    assert len(r0) == len(r1) == (37 // 2) // 4
    e0 = [_ids(r0), _ids(r1)]
    flat = torch.cat(e0[0] + e0[1]).tolist()
    assert len(flat) == len(set(flat)) == 2 * 4 * len(r0)  # disjoint, full batches only
    assert all(len(b) == 4 for b in e0[0] + e0[1])
    assert r0.epoch == 1 and r0.current_resolution() == 8
    # Same seed and epoch -> same order; another epoch -> another order.
    r0.set_epoch(0)
    assert [b.tolist() for b in _ids(r0)] == [b.tolist() for b in e0[0]]
    e1 = _ids(r0)
    assert [b.tolist() for b in e1] != [b.tolist() for b in e0[0]]
    # Exact mid-epoch resume from a saved position.
    r0.set_epoch(1)
    it = iter(r0)
    next(it), next(it)
    state = r0.state_dict()
    it.close()
    assert state["epoch"] == 1 and state["batch"] == 2
    r1.load_state_dict({**state, "batch": 2})  # another rank, same position: its own shard from batch 2
    r0.load_state_dict(state)
    assert [b.tolist() for b in _ids(r0)] == [b.tolist() for b in e1[2:]]
    assert r0.epoch == 2 and r0.state_dict()["batch"] == 0
    # Progressive resizing: epoch 2 reaches max_res; the pipeline is rebuilt at the new size.
    x, _ = next(iter(r0))
    assert x.shape[-2:] == (16, 16)
    with pytest.raises(ValueError, match="world_size"):
        r0.load_state_dict({**state, "world_size": 4})


def test_imagefolder_train_batches(raw_beton):
    out, _ = raw_beton
    loader = make_loader("train", source="auto", path=os.path.dirname(out), batch_size=4, num_workers=2,
                          image_size=12, channels_last=True, seed=0)
    assert loader.backend == "ffcv" and len(loader) == 11 // 4
    batches = [(x.clone(), y.clone()) for x, y in loader]
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == (4, 3, 12, 12) and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(x).all() and set(y.tolist()) <= {0, 1}
    lo, hi = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225  # default ImageNet statistics
    assert lo - 1e-4 <= min(float(x.min()) for x, _ in batches) and max(float(x.max()) for x, _ in batches) <= hi + 1e-4


def test_train_and_val_normalised_differently_is_refused(tmp_path):
    """Default statistics follow each file's sidecar: a val .beton whose sidecar is gone would be evaluated
    with ImageNet's statistics while training used Fashion-MNIST's. Refused, naming both files."""
    from fastkd.config import DataConfig
    from fastkd.data import build_loaders
    from fastkd.data.sources.fashion_mnist import CLASSES

    images, labels = np.zeros((8, 28, 28), np.uint8), np.arange(8) % 10
    for split in ("train", "test"):
        write_beton(ArraySource(images, labels, name=split, classes=CLASSES), str(tmp_path / f"{split}.beton"),
                    write_mode="raw", num_workers=1, progress=False)
    data = DataConfig(source="ffcv", path=str(tmp_path), num_workers=1, image_size=28)
    train, val = build_loaders("classification", data, batch_size=4)  # both sidecars: Fashion-MNIST's statistics
    assert train.normalization == val.normalization
    os.remove(tmp_path / "test.beton.json")
    with pytest.raises(ValueError, match=r"test\.beton\) would be normalised differently.*sidecar"):
        build_loaders("classification", data, batch_size=4)
    data.mean, data.std = list(MEAN), list(STD)  # explicit statistics: nothing to tell apart
    train, val = build_loaders("classification", data, batch_size=4)
    assert train.normalization == val.normalization == (MEAN, STD)


def test_ffcv_leaves_torch_thread_count_alone(id_beton):
    """FFCV sets torch's intra-op thread count to its worker count when a loader is built and when an epoch
    starts; the loader gives the process its own count back (a run's --threads, OMP_NUM_THREADS)."""
    path, _ = id_beton
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loader = make_loader("train", source="ffcv", path=path, batch_size=4, num_workers=2, image_size=8,
                              mean=MEAN, std=STD)
        assert torch.get_num_threads() == 1
        for _ in loader:
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
