"""PyTorch DataLoader fallback (same batch contract, reproducible augmentation), build_loaders and the CLI."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.config import DataConfig
from fastkd.data import build_loaders
from fastkd.data.classification.build import make_loader
from fastkd.data.classification.transforms import ResolutionSchedule
from fastkd.data.sources.idx import write_idx
from fastkd.data.seeded import crop_box, seed_key
from fastkd.data.classification.transforms import center_crop_box


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(1)
    for split, n in (("train", 9), ("val", 5)):
        for c in ("a", "b", "c"):
            os.makedirs(root / split / c)
            for k in range(n // 3 + (c == "a")):
                Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(root / split / c / f"{k}.png")
    Image.fromarray(rng.integers(0, 256, (18, 18), dtype=np.uint8)).save(root / "train" / "b" / "grey.png")
    (root / "train" / "c" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def test_torch_loader_contract_reproducible_and_resumable(tree):
    loader = make_loader("train", source="torch", path=str(tree), batch_size=3, num_workers=2, image_size=8,
                          seed=5, channels_last=True, on_corrupt="skip")
    assert loader.backend == "torch" and loader.num_samples == 11 and len(loader) == 3
    first = [(x.clone(), y.clone()) for x, y in loader]
    for x, y in first:
        assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert loader.epoch == 1
    loader.set_epoch(0)
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    # A fresh loader resumed at batch 2 of epoch 0 yields exactly the batches an uninterrupted run would.
    other = make_loader("train", source="torch", path=str(tree), batch_size=3, num_workers=0, image_size=8,
                         seed=5, channels_last=True, on_corrupt="skip")
    other.load_state_dict({"epoch": 0, "batch": 2})
    rest = list(other)
    assert len(rest) == 1 and all(torch.equal(a[0], b[0]) for a, b in zip(first[2:], rest))


def test_torch_loader_names_a_corrupt_file(tree):
    loader = make_loader("train", source="torch", path=str(tree), batch_size=12, num_workers=0, image_size=8)
    with pytest.raises(ValueError, match="broken.png"):
        list(loader)


def test_torch_val_shards_cover_the_split(tree):
    ids = []
    for rank in range(2):
        loader = make_loader("val", source="torch", path=str(tree), batch_size=2, num_workers=0, image_size=8,
                              distributed=True, rank=rank, world_size=2)
        assert loader.order(0).tolist() == list(range(rank, 4, 2))  # eval: file order, strided shards
        ids += [len(y) for _, y in loader]
    assert sum(ids) == 4


def test_fashion_idx_fallback_and_resolution_schedule(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 10), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8))
    sched = {"min_res": 16, "max_res": 32, "start_ramp": 1, "end_ramp": 3, "step": 8}
    data = DataConfig(source="torch", path=str(tmp_path), num_workers=0, image_size=28,
                      kwargs={"resolution_schedule": sched, "scale": (0.5, 1.0)})
    train, val = build_loaders("classification", data, batch_size=4)
    assert len(train) == 2 and len(val) == 1 and val.num_samples == 4
    x, y = next(iter(val))  # Fashion-MNIST defaults: whole image, its own statistics
    assert x.shape == (4, 3, 28, 28) and y.tolist() == [0, 1, 2, 3]
    assert abs(float(x[:, 0].mean()) - (0.5 - 0.2860) / 0.3530) < 0.2
    sizes = []
    for epoch in range(4):
        train.set_epoch(epoch)
        sizes.append(next(iter(train))[0].shape[-1])
    assert sizes == [16, 16, 24, 32]
    assert [ResolutionSchedule(160, 192, 2, 12)(e) for e in (0, 2, 4, 12, 20)] == [160, 160, 160, 192, 192]


def test_build_loaders_config_handling(tree):
    """The one loader signature: a data config (its other keys, e.g. the synthetic source's, are not the
    loader's), the task's options in ``kwargs`` (an unknown one is named, with the closest known one)."""
    data = DataConfig(source="torch", path=str(tree), image_size=8, num_workers=0, kwargs={"on_corrupt": "skip"})
    train, val = build_loaders("classification", data, batch_size=4, val_batch_size=5, seed=1)
    assert (train.batch_size, val.batch_size) == (4, 5)
    assert train.drop_last and not val.drop_last and train.shuffle and not val.shuffle
    data.kwargs = {"on_corupt": "skip"}
    with pytest.raises(ValueError, match="'on_corupt'.*did you mean 'on_corrupt'"):
        build_loaders("classification", data, batch_size=4)
    with pytest.raises(ValueError, match="no data loaders for task 'clasification'.*did you mean 'classification'"):
        build_loaders("clasification", data, batch_size=4)
    with pytest.raises(ValueError, match="0-1 scale"):
        make_loader("val", source="torch", path=str(tree), batch_size=2, mean=(124, 116, 104), std=(58, 57, 57))


def test_crop_boxes_stay_inside_and_match_the_recipe():
    rng = np.random.default_rng(0)
    k0, k1 = seed_key(3)
    for index in range(200):
        h, w = (int(v) for v in rng.integers(5, 60, 2))
        i, j, ch, cw = crop_box(h, w, 0.08, 1.0, 3 / 4, 4 / 3, k0, k1, 0, index)
        assert 0 <= i and 0 <= j and 0 < ch and 0 < cw and i + ch <= h and j + cw <= w
    assert center_crop_box(256, 320, 224 / 256) == (16, 48, 224, 224)


def test_cli_write_split_tree_and_inspect(tree, tmp_path, capsys):
    pytest.importorskip("ffcv")
    from fastkd.data.cli import main

    out = tmp_path / "betons"
    args = ["write", "imagefolder", str(tree), str(out), "--write-mode", "raw", "--num-workers", "1", "--no-progress"]
    assert main(args) == 0
    assert sorted(os.listdir(out)) == ["train.beton", "train.beton.json", "val.beton", "val.beton.json"]
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s)" in err and "broken.png" in err
    with pytest.raises(SystemExit, match="--force"):
        main(args)
    assert main(args + ["--force"]) == 0
    assert main(["inspect", str(out / "val.beton")]) == 0
    assert "4 samples" in capsys.readouterr().out
    assert main(["write", "imagefolder", str(tree / "train"), str(tmp_path / "x.beton"), "--on-corrupt", "error",
                 "--no-progress"]) == 2
    assert "broken.png" in capsys.readouterr().err and not (tmp_path / "x.beton").exists()
