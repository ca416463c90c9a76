"""Segmentation data: joint transforms keep image and label aligned, folder / Cityscapes sources, .beton, loaders."""
import os

import cv2
import numpy as np
import pytest
import torch

from fastkd.data.segmentation import cityscapes
from fastkd.config import DataConfig
from fastkd.data import build_loaders
from fastkd.data.segmentation.loader import SegLoader
from fastkd.data.segmentation.sources import BetonSegSource, SegDataError, fashion_scenes, write_seg_beton
from fastkd.data.segmentation.transforms import SegTrainTransform, dominated, photometric_distortion, rescale_size

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]],
                   dtype=np.uint8)


def blocky_label(h, w, seed, block=12):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, len(PALETTE), size=(-(-h // block), -(-w // block)))
    return np.kron(small, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)


def boundary(label, r=2):
    """Pixels within ``r`` of another label value: there the bilinear image and the nearest-neighbour label
    may disagree (OpenCV's nearest samples at x * scale, its bilinear at pixel centres); the crop's own
    border counts as a boundary (the pixels beyond it are unknown here)."""
    pad = np.pad(label, r, constant_values=254)
    out = np.zeros(label.shape, bool)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= pad[dy:dy + label.shape[0], dx:dx + label.shape[1]] != label
    return out


@pytest.mark.parametrize("seed", range(6))
def test_label_drawn_from_the_image_survives_rescale_crop_flip(seed):
    label = blocky_label(90, 130, seed, block=20)
    image = PALETTE[label]
    t = SegTrainTransform(crop_size=(64, 80), img_scale=(130, 90), ratio_range=(0.5, 2.0), photometric=False,
                          cat_max_ratio=0.75, seed=seed)
    flips = 0
    for index in range(4):
        out_img, out_lab = t(image, label, index=index, epoch=1)
        assert out_img.shape == (64, 80, 3) and out_lab.shape == (64, 80) and out_lab.dtype == np.uint8
        pad = out_lab == 255
        assert (out_img[pad] == 0).all()  # padding: image 0, label ignored
        inner = ~pad & ~boundary(out_lab)
        assert inner.sum() > 0.3 * (~pad).sum()
        assert (out_img[inner] == PALETTE[out_lab[inner]]).all()  # the image's colour is its label's colour
        # a flip of one without the other would be caught: the mirrored label disagrees with the image
        mirrored = out_lab[:, ::-1]
        flips += (out_img[inner] != PALETTE[np.where(mirrored == 255, 0, mirrored)][inner]).any()
    assert flips > 0


def test_same_seed_same_sample_same_output_and_photometric_keeps_label():
    label = blocky_label(60, 70, 1)
    image = PALETTE[label]
    t = SegTrainTransform(crop_size=(32, 32), img_scale=(70, 60), seed=3)
    a, b = t(image, label, 5, 2), t(image, label, 5, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = t(image, label, 5, 3)
    assert not (np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]))  # another epoch, another draw
    nophoto = SegTrainTransform(crop_size=(32, 32), img_scale=(70, 60), seed=3, photometric=False)
    assert np.array_equal(nophoto(image, label, 5, 2)[1], a[1])  # photometric distortion leaves labels alone
    rng = np.random.default_rng(0)
    changed = sum(not np.array_equal(photometric_distortion(image, rng), image) for _ in range(8))
    assert changed >= 6


def test_rescale_size_and_cat_max_ratio():
    assert rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert rescale_size(1024, 2048, (1024, 512)) == (512, 1024)
    assert rescale_size(100, 100, (2048, 1024)) == (1024, 1024)
    assert dominated(np.zeros((4, 4), np.uint8), 0.75, 255)
    half = np.zeros((4, 4), np.uint8)
    half[:2] = 1
    assert not dominated(half, 0.75, 255)
    mostly = np.full((4, 4), 255, np.uint8)
    mostly[0, :3], mostly[0, 3] = 1, 2  # 3 of 4 labelled pixels are class 1
    assert dominated(mostly, 0.75, 255) and not dominated(mostly, 0.8, 255)
    # with a large uniform region, crops avoid being > 75 % one class whenever they can
    label = np.zeros((100, 100), np.uint8)
    label[:, 70:] = 1
    t = SegTrainTransform(crop_size=(40, 40), img_scale=(100, 100), ratio_range=(1, 1), photometric=False,
                          flip_prob=0, seed=0)
    shares = [np.bincount(t(PALETTE[label], label, i, 0)[1].ravel(), minlength=2).max() / 1600 for i in range(20)]
    assert max(shares) < 0.75


def write_scenes(root, split, n, sizes=((40, 56), (48, 48))):
    os.makedirs(os.path.join(root, split))
    os.makedirs(os.path.join(root, "masks", split))
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        label = blocky_label(h, w, i, block=8) % 11
        cv2.imwrite(os.path.join(root, split, f"{i:06d}.jpg"), PALETTE[label % 6][:, :, ::-1])
        cv2.imwrite(os.path.join(root, "masks", split, f"{i:06d}.png"), label)


def test_fashion_scenes_reader_and_errors(tmp_path):
    write_scenes(str(tmp_path), "train", 3)
    src = fashion_scenes(str(tmp_path), "train")
    assert len(src) == 3 and src.num_classes == 11 and src.classes[0] == "background"
    image, label = src[1]
    assert image.shape == (48, 48, 3) and label.shape == (48, 48)
    assert np.array_equal(label, blocky_label(48, 48, 1, block=8) % 11)
    with pytest.raises(SegDataError, match="masks"):
        fashion_scenes(str(tmp_path), "val")
    os.remove(tmp_path / "masks" / "train" / "000002.png")
    with pytest.raises(SegDataError, match="000002.jpg.*does not exist"):
        fashion_scenes(str(tmp_path), "train")


def write_cityscapes(root, split, cities=("aachen", "bonn"), h=24, w=48):
    ids = np.array([0, 7, 8, 11, 26, 33, 9, 24], dtype=np.uint8)  # 0 and 9 are ignored ids
    k = 0
    for city in cities:
        for frame in range(2):
            stem = f"{city}_{k:06d}_{frame:06d}"
            d_img = os.path.join(root, "leftImg8bit", split, city)
            d_lab = os.path.join(root, "gtFine", split, city)
            os.makedirs(d_img, exist_ok=True)
            os.makedirs(d_lab, exist_ok=True)
            label_ids = ids[blocky_label(h, w, k, block=6) % len(ids)]
            cv2.imwrite(os.path.join(d_img, stem + "_leftImg8bit.png"), np.dstack([label_ids] * 3))
            cv2.imwrite(os.path.join(d_lab, stem + "_gtFine_labelIds.png"), label_ids)
            cv2.imwrite(os.path.join(d_lab, stem + "_gtFine_color.png"), np.dstack([label_ids] * 3))
            k += 1


def test_cityscapes_train_ids_and_beton_round_trip(tmp_path):
    root = str(tmp_path / "cs")
    write_cityscapes(root, "val")
    lut = cityscapes.train_id_lut()
    assert lut[7] == 0 and lut[33] == 18 and lut[26] == 13 and lut[0] == 255 and lut[9] == 255
    assert len(cityscapes.CLASSES) == 19 and (lut != 255).sum() == 19
    src = cityscapes.source(root, "val")
    assert len(src) == 4
    out = str(tmp_path / "out" / "val.beton")
    assert write_seg_beton(src, out, num_workers=1) == 4
    beton = BetonSegSource(out)
    assert len(beton) == 4 and beton.num_classes == 19
    for i in range(4):
        image, label = beton[i]
        ref_image, ref_label = src[i]
        assert np.array_equal(label, ref_label) and np.array_equal(image, ref_image)  # PNG kept lossless
        assert np.array_equal(label, lut[image[:, :, 0]])  # the image holds the label ids
    with pytest.raises(FileExistsError):
        write_seg_beton(src, out)
    with pytest.raises(SegDataError, match="not a Cityscapes root"):
        cityscapes.source(str(tmp_path), "train")


def test_cli_writes_cityscapes_and_reports_bad_roots(tmp_path, capsys):
    from fastkd.cli import main

    root = str(tmp_path / "cs")
    write_cityscapes(root, "train")
    write_cityscapes(root, "val", cities=("lindau",))
    assert main(["data", "write", "cityscapes", root, str(tmp_path / "b"), "--num-workers", "1"]) == 0
    assert len(BetonSegSource(str(tmp_path / "b" / "train.beton"))) == 4
    assert len(BetonSegSource(str(tmp_path / "b" / "val.beton"))) == 2
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "b" / "val.beton")]) == 0
    assert "segmentation: 19 classes, ignore 255, images png, height 24-24 x width 48-48" in capsys.readouterr().out
    assert main(["data", "write", "cityscapes", str(tmp_path / "nope"), str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def test_cli_cityscapes_no_progress_silences_ffcv_s_bar(tmp_path, capsys):
    from fastkd.cli import main

    root = str(tmp_path / "cs")
    write_cityscapes(root, "val")
    base = ["data", "write", "cityscapes", root, "--splits", "val", "--num-workers", "1"]
    assert main(base + [str(tmp_path / "a")]) == 0
    assert "4/4 [" in capsys.readouterr().err  # FFCV's writer draws a bar by default
    assert main(base + [str(tmp_path / "b"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "%|" not in err and "4/4" not in err, err


def seg_loaders(source, path, *, micro, options, num_workers=2, **kw):
    """(train, val) through the one loader signature."""
    data = DataConfig(source=source, path=path, num_workers=num_workers, kwargs=options)
    return build_loaders("segmentation", data, batch_size=micro, **kw)


def batches(loader):
    return [(b.images.clone(), b.labels.clone()) for b in loader]


def test_loader_reproducible_sharded_and_resumes_exactly(tmp_path):
    write_scenes(str(tmp_path), "train", 8)
    write_scenes(str(tmp_path), "val", 3)
    opts = dict(crop_size=(32, 32), img_scale=(56, 40))
    train, val = seg_loaders("fashion-scenes", str(tmp_path), micro=2, seed=7, num_workers=0, options=opts)
    assert len(train) == 4 and len(val) == 3 and train.num_classes == 11
    first = batches(train)
    assert train.epoch == 1
    train.set_epoch(0)
    again = batches(train)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert first[0][0].shape == (2, 3, 32, 32) and first[0][0].dtype == torch.uint8
    # resume after 2 batches with 2 workers: the same remaining batches
    w2, _ = seg_loaders("fashion-scenes", str(tmp_path), micro=2, seed=7, num_workers=2, options=opts)
    it = iter(w2)
    next(it), next(it)
    state = w2.state_dict()
    del it
    resumed, _ = seg_loaders("fashion-scenes", str(tmp_path), micro=2, seed=7, num_workers=1, options=opts)
    resumed.load_state_dict(state)
    rest = batches(resumed)
    assert len(rest) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                  for a, b in zip(first[2:], rest))
    # two ranks: each reads half of every global batch of 2 x 1
    r0, _ = seg_loaders("fashion-scenes", str(tmp_path), micro=1, rank=0, world_size=2, seed=7, num_workers=0,
                              options=opts)
    r1, _ = seg_loaders("fashion-scenes", str(tmp_path), micro=1, rank=1, world_size=2, seed=7, num_workers=0,
                              options=opts)
    b0, b1 = batches(r0), batches(r1)
    assert torch.equal(torch.cat([b0[0][0], b1[0][0]]), first[0][0])
    # eval: images as stored, padded to the batch's largest with ignored labels
    vb = next(iter(SegLoader(val.source, transform=None, batch_size=3, num_workers=0, drop_last=False)))
    assert vb.images.shape == (3, 3, 48, 56)
    assert (vb.labels[1, :, 48:] == 255).all() and (vb.labels[0, 40:] == 255).all()
    with pytest.raises(ValueError, match="unknown segmentation data option"):
        seg_loaders("fashion-scenes", str(tmp_path), micro=2, options={"crop": 3})


def test_beton_loader_reads_what_the_folder_loader_reads(tmp_path):
    root = str(tmp_path / "scenes")
    write_scenes(root, "train", 4)
    write_scenes(root, "val", 2)
    for split in ("train", "val"):  # JPEG scenes: decoded once, stored as lossless PNG
        write_seg_beton(fashion_scenes(root, split), str(tmp_path / "b" / f"{split}.beton"), num_workers=1)
    opts = dict(crop_size=(24, 24), img_scale=(56, 40))
    folder = seg_loaders("fashion-scenes", root, micro=2, seed=1, num_workers=0, options=opts)
    beton = seg_loaders("ffcv", str(tmp_path / "b"), micro=2, seed=1, num_workers=0, options=opts)
    for a, b in zip(folder, beton):
        got, want = batches(b), batches(a)
        assert len(got) == len(want) > 0
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(got, want))
    assert beton[1].num_classes == 11 and beton[1].classes[0] == "background"
    jpg = str(tmp_path / "jpg.beton")
    write_seg_beton(fashion_scenes(root, "val"), jpg, image_format="jpg", jpeg_quality=95, num_workers=1)
    image, label = BetonSegSource(jpg)[1]
    ref_image, ref_label = fashion_scenes(root, "val")[1]
    assert np.array_equal(label, ref_label)  # labels always lossless
    err = np.abs(image.astype(int) - ref_image).mean()
    assert 0 < err < 16  # re-encoded as JPEG (saturated 8 px colour blocks: chroma subsampling shows)
