"""COCO detection data: fashion-scenes -> COCO JSON + JPEG -> .beton -> FFCV / DataLoader batches.

Small on purpose: every FFCV loader JIT-compiles its pipeline (several seconds), so the tests build
three of them.
"""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")
pytest.importorskip("pycocotools")
from PIL import Image  # noqa: E402

from fastkd.data.sources import fashion_mnist  # noqa: E402
from fastkd.data.detection.coco import CocoFormatError, load_coco, write_coco_beton  # noqa: E402
from fastkd.data.detection.batch import (batch_bucket, boxes_to_original, bucket_shapes, grouped_order,  # noqa: E402
                                   resized_hw, to_device)
from fastkd.data.detection.loader import make_loader  # noqa: E402
from fastkd.data.sources.scenes import (CANVASES, ScenesConfig, label_map, render_scene,  # noqa: E402
                                        write_fashion_scenes)
from fastkd.tasks.detection.coco_eval import detections_to_coco, evaluate_coco  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
SIZES = dict(min_size=160, max_size=224)


def _fmnist_dir():
    try:
        return fashion_mnist.locate(download_ok=False)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST (Debian dataset-fashion-mnist) not installed")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    _fmnist_dir()
    out = tmp_path_factory.mktemp("scenes") / "fs"
    write_fashion_scenes(str(out), ScenesConfig(train=14, val=7, masks=True, seed=3))
    return out


@pytest.fixture(scope="module")
def betons(scenes, tmp_path_factory):
    d = tmp_path_factory.mktemp("beton")
    paths = {}
    for split in ("train", "val"):
        paths[split] = str(d / f"{split}.beton")
        write_coco_beton(str(scenes / split), str(scenes / "annotations" / f"instances_{split}.json"),
                         paths[split], num_workers=1)
    return paths


def _gt_xyxy(json_path):
    doc = json.load(open(json_path))
    out = {im["id"]: [] for im in doc["images"]}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        out[a["image_id"]].append((x, y, x + w, y + h))
    return {k: np.array(v, np.float64).reshape(-1, 4) for k, v in out.items()}


# -- fashion-scenes -------------------------------------------------------------------------
def test_scenes_are_deterministic_and_boxes_and_masks_follow_the_visible_pixels(scenes, tmp_path):
    doc = json.load(open(scenes / "annotations" / "instances_train.json"))
    again = tmp_path / "again"
    write_fashion_scenes(str(again), ScenesConfig(train=14, val=0, masks=True, seed=3))
    assert json.load(open(again / "annotations" / "instances_train.json")) == doc
    assert (again / "train" / "000005.jpg").read_bytes() == (scenes / "train" / "000005.jpg").read_bytes()
    assert len(doc["categories"]) == 10 and {c["id"] for c in doc["categories"]} == set(range(1, 11))
    shapes = {(im["height"], im["width"]) for im in doc["images"]}
    assert len(shapes) >= 3 and shapes <= set(CANVASES)
    per_image = {}
    for a in doc["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)
    assert all(1 <= len(v) <= 8 for v in per_image.values()) and len(per_image) == 14
    garments, labels = fashion_mnist.load("train", _fmnist_dir())
    overlaps = 0
    for i, im in enumerate(doc["images"]):
        image, instances, classes = render_scene(garments, labels, seed=3, split="train", index=i)
        anns = per_image[im["id"]]
        assert [a["category_id"] for a in anns] == classes
        mask = np.array(Image.open(scenes / "masks" / "train" / f"{i:06d}.png"))
        np.testing.assert_array_equal(mask, label_map(instances, classes))
        for k, a in enumerate(anns, start=1):
            ys, xs = np.nonzero(instances == k)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert a["area"] == len(xs) and (mask[ys, xs] == a["category_id"]).all()
        boxes = np.array([a["bbox"] for a in anns], float)
        for p in range(len(boxes)):
            for q in range(p):
                bp, bq = boxes[p], boxes[q]
                overlaps += (min(bp[0] + bp[2], bq[0] + bq[2]) > max(bp[0], bq[0])
                             and min(bp[1] + bp[3], bq[1] + bq[3]) > max(bp[1], bq[1]))
    assert overlaps > 0


def test_garment_sizes_bound_the_garments_and_default_to_the_classic_range():
    garments, labels = fashion_mnist.load("test", _fmnist_dir())
    sides = {}
    for sizes in ((24, 96), (48, 96)):
        sides[sizes] = []
        for i in range(12):
            kw = dict(seed=2, split="val", index=i, scale=0.5, max_garments=4)
            image, instances, classes = render_scene(garments, labels, garment_sizes=sizes, **kw)
            if sizes == (24, 96):  # the default range: the very scenes written without the argument
                default = render_scene(garments, labels, **kw)
                np.testing.assert_array_equal(image, default[0])
                assert classes == default[2]
            for k in range(1, len(classes) + 1):
                ys, xs = np.nonzero(instances == k)
                sides[sizes].append(max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()))
    assert max(sides[(48, 96)]) <= 48 and max(sides[(24, 96)]) <= 48  # the largest side times scale 0.5
    assert np.median(sides[(48, 96)]) > np.median(sides[(24, 96)]) + 5
    for bad in ((4, 96), (96, 48)):
        with pytest.raises(ValueError, match="garment_sizes"):
            ScenesConfig(garment_sizes=bad)


# -- geometry and order ---------------------------------------------------------------------
def test_resize_rule_and_buckets():
    assert resized_hw(480, 640, 800, 1333) == (800, 1067)
    assert resized_hw(400, 1000, 800, 1333) == (533, 1333)        # the longer side caps the scale
    assert resized_hw(640, 480, 800, 1333) == (1067, 800)
    assert bucket_shapes(800, 1333) == ((800, 1344), (1344, 800), (1344, 1344))
    assert batch_bucket(np.array([True, True]), 800, 1333) == (800, 1344)
    assert batch_bucket(np.array([True, False]), 800, 1333) == (1344, 1344)


def test_grouped_order_shards_and_groups():
    rng = np.random.default_rng(0)
    land = rng.random(50) < 0.6
    cand = np.arange(50)
    kw = dict(seed=1, epoch=2, shuffle=True, batch_size=4, drop_last=True)
    shards = [grouped_order(land, cand, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) and not set(shards[0]) & set(shards[1])
    for s in shards:
        for b in s.reshape(-1, 4):
            assert land[b].all() or not land[b].any()                  # one orientation per batch
    np.testing.assert_array_equal(shards[0], grouped_order(land, cand, rank=0, world_size=2, **kw))
    evals = [grouped_order(land, cand, rank=r, world_size=3, seed=0, epoch=0, shuffle=False, batch_size=4,
                           drop_last=False) for r in range(3)]
    assert sorted(np.concatenate(evals).tolist()) == list(range(50))


def test_grouped_order_same_steps_for_any_split_of_processes_and_accumulation():
    # One optimizer step = grad_accum x world x batch samples; micro-step m of rank r reads chunk
    # m * world + r (the engine's convention), so 1 process x 2 accumulation steps and 2 processes x 1
    # see the same samples in every step, one orientation per micro-batch.
    rng = np.random.default_rng(3)
    land, cand = rng.random(64) < 0.5, np.arange(64)
    kw = dict(seed=5, epoch=1, shuffle=True, batch_size=2, drop_last=True)
    one = grouped_order(land, cand, rank=0, world_size=1, grad_accum=2, **kw).reshape(-1, 2, 2)  # [step, m, b]
    two = [grouped_order(land, cand, rank=r, world_size=2, grad_accum=1, **kw).reshape(-1, 2) for r in range(2)]
    np.testing.assert_array_equal(one[:, 0], two[0])
    np.testing.assert_array_equal(one[:, 1], two[1])
    for step in one:
        assert land[step.reshape(-1)].all() or not land[step.reshape(-1)].any()


# -- write -> load -> map back --------------------------------------------------------------
@pytest.fixture(scope="module")
def val_batches(betons):
    """Every val batch from both backends, flips on (p = 0.5), cloned out of FFCV's buffers."""
    out = {}
    for source in ("ffcv", "torch"):
        loader = make_loader(betons["val"], source=source, train=False, batch_size=3, flip_prob=0.5,
                                        seed=11, num_workers=1, **SIZES)
        out[source] = [(b.images.clone(), b.targets) for b in loader]
        assert len(out[source]) == len(loader) == 3
    return out


def test_boxes_survive_write_load_resize_flip_pad_and_map_back(scenes, val_batches):
    gt = _gt_xyxy(scenes / "annotations" / "instances_val.json")
    flips = 0
    for images, targets in val_batches["ffcv"]:
        assert images.dtype == torch.uint8 and tuple(images.shape[2:]) in bucket_shapes(160, 224)
        for i, t in enumerate(targets):
            flips += t["flipped"]
            h, w = t["size"]
            assert (h, w) == resized_hw(*t["orig_size"], 160, 224)
            assert images[i, :, h:].eq(0).all() and images[i, :, :, w:].eq(0).all()
            b = t["boxes"]
            assert b.dtype == torch.float32 and (b[:, 0] >= 0).all() and (b[:, 2] <= w + 1e-4).all()
            torch.testing.assert_close(boxes_to_original(b, t), torch.from_numpy(gt[t["image_id"]]),
                                       rtol=0, atol=1e-4)
            assert t["labels"].dtype == torch.int64 and t["labels"].min() >= 1
    assert 0 < flips < 7


def test_ffcv_and_dataloader_agree(val_batches):
    for (a, ta), (b, tb) in zip(val_batches["ffcv"], val_batches["torch"]):
        assert a.shape == b.shape
        for x, y in zip(ta, tb):
            assert x["image_id"] == y["image_id"] and x["flipped"] == y["flipped"] and x["size"] == y["size"]
            assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["labels"], y["labels"])
        # same pixels up to the two libjpeg-turbo / OpenCV builds (a wrong flip or offset gives ~50)
        diff = (a.int() - b.int()).abs().float()
        assert diff.mean() < 2.0, diff.mean()


def test_flip_mirrors_the_image_region(betons):
    kw = dict(source="torch", train=False, batch_size=7, seed=0, **SIZES)
    plain = next(iter(make_loader(betons["val"], flip_prob=0.0, **kw)))
    flipped = next(iter(make_loader(betons["val"], flip_prob=1.0, **kw)))
    for i, (t, u) in enumerate(zip(plain.targets, flipped.targets)):
        h, w = t["size"]
        assert u["flipped"] and not t["flipped"]
        assert torch.equal(flipped.images[i, :, :h, :w], plain.images[i, :, :h, :w].flip(-1))
        assert flipped.images[i, :, :, w:].eq(0).all()
        torch.testing.assert_close(u["boxes"][:, [2, 0]], w - t["boxes"][:, [0, 2]])


def test_downscaled_storage_keeps_boxes_in_original_pixels(scenes, tmp_path):
    path = str(tmp_path / "small.beton")
    write_coco_beton(str(scenes / "val"), str(scenes / "annotations" / "instances_val.json"), path,
                     max_side=100, jpeg_quality=80, num_workers=1)
    gt = _gt_xyxy(scenes / "annotations" / "instances_val.json")
    loader = make_loader(path, source="torch", train=False, batch_size=4, flip_prob=0.5, seed=2, **SIZES)
    for batch in loader:
        for t in batch.targets:
            assert max(t["size"]) <= 224
            torch.testing.assert_close(boxes_to_original(t["boxes"], t), torch.from_numpy(gt[t["image_id"]]),
                                       rtol=0, atol=1e-4)


def test_ground_truth_as_predictions_scores_ap_1(scenes, val_batches):
    label_to_category = list(range(11))
    results = []
    for _, targets in val_batches["ffcv"]:
        dets = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(1, 0.5, len(t["labels"]))}
                for t in targets]
        results += detections_to_coco(dets, targets, label_to_category)
    metrics = evaluate_coco(results, str(scenes / "annotations" / "instances_val.json"))
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75"):
        assert metrics[key] == pytest.approx(1.0), metrics
    assert all(metrics[k] in (1.0, -1.0) for k in ("bbox_APs", "bbox_APm", "bbox_APl"))


def test_to_device_normalises_and_zeroes_the_padding(val_batches):
    images, targets = val_batches["torch"][0]
    from fastkd.data.detection.batch import DetectionBatch

    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    out = to_device(DetectionBatch(images, targets), "cpu", mean=mean, std=std, channels_last=True)
    assert out.images.dtype == torch.float32 and out.images.is_contiguous(memory_format=torch.channels_last)
    ref = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    for i, t in enumerate(targets):
        h, w = t["size"]
        torch.testing.assert_close(out.images[i, :, :h, :w], ref[i, :, :h, :w])
        assert out.images[i, :, h:].eq(0).all() and out.images[i, :, :, w:].eq(0).all()


# -- reproducibility and resume -------------------------------------------------------------
def _snapshot(batch):
    return batch.images.clone(), [(t["image_id"], t["flipped"], t["boxes"].clone()) for t in batch.targets]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert torch.equal(ia, ib)
        assert [(x[0], x[1]) for x in ta] == [(y[0], y[1]) for y in tb]
        assert all(torch.equal(x[2], y[2]) for x, y in zip(ta, tb))


@pytest.mark.parametrize("source", ["ffcv", "torch"])
def test_same_seed_same_batches_twice_and_after_mid_epoch_resume(betons, source):
    kw = dict(source=source, train=True, batch_size=2, seed=5, num_workers=1, **SIZES)
    loader = make_loader(betons["train"], **kw)
    loader.set_epoch(1)
    first = [_snapshot(b) for b in loader]
    assert loader.state_dict()["epoch"] == 2
    loader.set_epoch(1)
    _assert_same(first, [_snapshot(b) for b in loader])
    for images, targets in first:  # training batches: one orientation each
        assert tuple(images.shape[2:]) in bucket_shapes(160, 224)[:2]

    loader.set_epoch(1)
    it = iter(loader)
    head = [_snapshot(next(it)) for _ in range(2)]
    state = loader.state_dict()
    it.close()
    assert state["epoch"] == 1 and state["batch"] == 2
    resumed = make_loader(betons["train"], **kw)
    resumed.load_state_dict(state)
    _assert_same(head + [_snapshot(b) for b in resumed], first)


def test_empty_images_kept_for_eval_and_skipped_for_training(tmp_path):
    root, ann = _tiny_coco(tmp_path)
    path = str(tmp_path / "tiny.beton")
    write_coco_beton(str(root), ann, path, num_workers=1)
    meta = json.load(open(path + ".json"))
    assert meta["label_to_category"] == [0, 5, 17, 90] and meta["empty_images"] == 1
    val = make_loader(path, source="torch", train=False, batch_size=2, **SIZES)
    train = make_loader(path, source="torch", train=True, batch_size=1, **SIZES)
    assert val.num_samples == 4 and train.num_samples == 3
    ids = [t["image_id"] for b in val for t in b.targets]
    assert sorted(ids) == [10, 11, 12, 13]
    batch = next(iter(make_loader(path, source="torch", train=False, batch_size=4, **SIZES)))
    t = {t["image_id"]: t for t in batch.targets}
    assert t[13]["boxes"].shape == (0, 4) and t[11]["iscrowd"].tolist() == [0, 1]
    assert t[11]["labels"].tolist() == [3, 1]                                      # ids 90, 5 -> labels 3, 1
    res = detections_to_coco([{"boxes": t[11]["boxes"], "labels": t[11]["labels"], "scores": torch.ones(2)}],
                             [t[11]], val.label_to_category)
    assert [r["category_id"] for r in res] == [90, 5]


# -- bad input ------------------------------------------------------------------------------
def _tiny_coco(root):
    """4 images of different sizes, categories 5/17/90, a crowd box, an image without boxes."""
    images = root / "img"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for k, (h, w) in enumerate([(40, 60), (70, 30), (50, 50), (33, 47)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{k}.jpg")
        entries.append({"id": 10 + k, "file_name": f"{k}.jpg", "height": h, "width": w})
    anns = [{"id": 1, "image_id": 10, "category_id": 5, "bbox": [1.5, 2.0, 20.25, 30.0], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 90, "bbox": [0, 0, 10, 10]},
            {"id": 3, "image_id": 11, "category_id": 5, "bbox": [5, 5, 20, 60], "iscrowd": 1},
            {"id": 4, "image_id": 12, "category_id": 17, "bbox": [10, 10, 5, 5]}]
    doc = {"images": entries, "annotations": anns,
           "categories": [{"id": 90, "name": "c"}, {"id": 5, "name": "a"}, {"id": 17, "name": "b"}]}
    path = root / "instances.json"
    path.write_text(json.dumps(doc))
    return images, str(path)


def _bad(tmp_path, change):
    images, path = _tiny_coco(tmp_path)
    doc = json.load(open(path))
    change(doc, images)
    with open(path, "w") as f:
        json.dump(doc, f)
    return images, path


@pytest.mark.parametrize("change, message", [
    (lambda d, i: d.pop("categories"), "missing or non-list top-level key 'categories'"),
    (lambda d, i: d["annotations"][2].update(category_id=7), "annotations[2] (id 3) has category_id 7"),
    (lambda d, i: d["annotations"][1].update(image_id=99), "annotations[1] (id 2) refers to image id 99"),
    (lambda d, i: d["annotations"][0].update(bbox=[1, 2, 3]), "annotations[0] (id 1): bbox [1, 2, 3]"),
    (lambda d, i: d["images"][1].pop("width"), "images[1] (id 11) has no 'width'"),
    (lambda d, i: d["images"][2].update(id=10), "images[2]: duplicate image id 10"),
    (lambda d, i: os.remove(i / "2.jpg"), "image id 12"),
    (lambda d, i: d["images"][0].update(height=41), "the file is 40x60 but its entry says 41x60"),
])
def test_bad_annotations_name_the_file_and_entry(tmp_path, change, message):
    images, path = _bad(tmp_path, change)
    out = tmp_path / "out.beton"
    with pytest.raises(CocoFormatError) as e:
        write_coco_beton(str(images), path, str(out), num_workers=1)
    assert message in str(e.value) and path in str(e.value)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out.beton")]  # no file, no temporary


def test_boxes_outside_or_empty_are_clipped_or_skipped_and_counted(tmp_path):
    def change(d, i):
        d["annotations"] += [{"id": 7, "image_id": 10, "category_id": 5, "bbox": [50, 30, 30, 30]},   # clipped
                             {"id": 8, "image_id": 10, "category_id": 5, "bbox": [70, 5, 5, 5]},    # outside
                             {"id": 9, "image_id": 12, "category_id": 17, "bbox": [3, 3, 0, 4]}]    # empty
    images, path = _bad(tmp_path, change)
    index = load_coco(path, str(images))
    assert index.clipped == [7] and index.skipped == [(8, "outside its image"), (9, "empty")]
    assert index.images[0].boxes.tolist()[-1] == [50, 30, 60, 40]


def test_cli_writes_and_reports_bad_input_with_status_2(tmp_path, capsys):
    from fastkd.data.cli import main

    images, path = _tiny_coco(tmp_path)
    out = tmp_path / "a.beton"
    args = ["write", "coco", "--images", str(images), "--annotations"]
    assert main(args + [path, str(out), "--num-workers", "1"]) == 0
    assert "4 images (1 without boxes), 4 boxes" in capsys.readouterr().out and out.exists()
    (tmp_path / "broken.json").write_text('{"images": [}')
    assert main(args + [str(tmp_path / "broken.json"), str(tmp_path / "b.beton")]) == 2
    err = capsys.readouterr().err
    assert "broken.json: not valid JSON" in err and "Traceback" not in err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("b.beton")]


def test_cli_no_progress_silences_ffcv_s_bar(tmp_path, capsys):
    from fastkd.data.cli import main

    images, path = _tiny_coco(tmp_path)
    args = ["write", "coco", "--images", str(images), "--annotations", path, "--num-workers", "1"]
    assert main(args + [str(tmp_path / "a.beton")]) == 0
    assert "4/4 [" in capsys.readouterr().err  # FFCV's writer draws a bar by default
    assert main(args + [str(tmp_path / "b.beton"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "%|" not in err and "4/4" not in err, err


def test_training_shards_are_disjoint_equal_and_one_orientation_per_batch(betons):
    kw = dict(source="torch", train=True, batch_size=2, seed=9, world_size=2, **SIZES)
    shards = [make_loader(betons["train"], rank=r, **kw) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) > 0
    seen = [[t["image_id"] for b in s for t in b.targets] for s in shards]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1])
    for s in shards:
        s.set_epoch(0)
        for b in s:
            land = [t["size"][1] >= t["size"][0] for t in b.targets]
            assert len(set(land)) == 1 and tuple(b.images.shape[2:]) == bucket_shapes(160, 224)[0 if land[0] else 1]


def test_fashion_scenes_cli(tmp_path, capsys):
    from fastkd.data.cli import main

    _fmnist_dir()
    out = tmp_path / "fs"
    assert main(["write", "fashion-scenes", str(out), "--train", "2", "--val", "1", "--masks"]) == 0
    assert sorted(os.listdir(out)) == ["annotations", "masks", "train", "val"]
    assert main(["write", "fashion-scenes", str(out), "--train", "2"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["write", "fashion-scenes", str(tmp_path / "x"), "--train", "0", "--val", "0"]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["write", "fashion-scenes", str(tmp_path / "y"), "--garment-sizes", "96", "48"]) == 2
    assert "garment_sizes" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_ffcv_detection_loader_leaves_torch_thread_count_alone(betons):
    """FFCV sets torch's thread count to its worker count at build and at each epoch start; the detection
    loader gives the process its own count back."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loader = make_loader(betons["val"], source="ffcv", train=False, batch_size=4, seed=0,
                                        num_workers=2, **SIZES)
        assert torch.get_num_threads() == 1
        for _ in loader:
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


_THREADS_SCRIPT = """
import sys, torch
torch.set_num_threads(3)
from fastkd.engine.preflight import beton_problem
from fastkd.data.detection.loader import make_loader
seen = []
assert beton_problem(sys.argv[1]) is None
seen.append(("header read", torch.get_num_threads()))
for source in ("torch", "ffcv"):
    loader = make_loader(sys.argv[1], source=source, train=True, batch_size=2, min_size=160,
                         max_size=224, **({"num_workers": 2} if source == "ffcv" else {}))
    seen.append((source + " built", torch.get_num_threads()))
    for _ in loader:
        seen.append((source + " batch", torch.get_num_threads()))
import fastkd.data.classification.ffcv_loader
seen.append(("classification loader imported", torch.get_num_threads()))
print(seen)
"""


def test_importing_ffcv_leaves_torch_thread_count_alone(betons):
    """FFCV's first import sets torch's thread count to 1 (ffcv/pipeline/compiler.py, module level): in a
    fresh process that asked for 3 threads, reading a .beton's header, building and iterating either
    detection loader, and importing the classification loader all leave the count at 3."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, betons["train"]], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own script's printed list
    assert len(seen) > 4 and all(n == 3 for _, n in seen), seen
