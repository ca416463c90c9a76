"""COCO evaluation: 2 real processes (gloo) sharding the validation set give the AP of one process."""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("pycocotools")
from fastkd.tasks.detection.coco_eval import coco_metrics, evaluate_coco  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each rank reads its shard of the val set, makes imperfect predictions that depend on the image only
# (shifted ground truth, a confused label, a false positive; distinct scores), evaluates.
_SCRIPT = r"""
import json, os, sys
import numpy as np, torch
from fastkd.data.detection.loader import make_loader
from fastkd.tasks.detection.coco_eval import detections_to_coco, evaluate_coco

beton, gt, out = sys.argv[1:4]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if world > 1:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
loader = make_loader(beton, source="torch", train=False, batch_size=2, flip_prob=0.5, seed=4,
                                rank=rank, world_size=world, min_size=160, max_size=224)
results, ids = [], []
for batch in loader:
    dets = []
    for t in batch.targets:
        rng = np.random.default_rng(t["image_id"])
        k = len(t["labels"])
        boxes = t["boxes"] + torch.from_numpy(rng.normal(0, 3, (k, 4))).float()
        labels = t["labels"].clone()
        labels[0] = labels[0] % 10 + 1
        boxes = torch.cat([boxes, torch.tensor([[5.0, 5.0, 40.0, 40.0]])])
        labels = torch.cat([labels, torch.tensor([3])])
        scores = torch.from_numpy(rng.uniform(0.05, 1.0, k + 1)).float()
        dets.append({"boxes": boxes, "labels": labels, "scores": scores})
    results += detections_to_coco(dets, batch.targets, loader.label_to_category)
    ids += [t["image_id"] for t in batch.targets]
metrics = evaluate_coco(results, gt, image_ids=ids, results_path=out + ".results.json")
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump(metrics, f)
if world > 1:  # leave the group cleanly: gloo's threads must not meet the interpreter's exit
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script, args, world, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), *args], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out


@pytest.mark.slow
def test_two_process_evaluation_gives_the_single_process_ap(tmp_path):
    pytest.importorskip("ffcv")
    from fastkd.data.sources import fashion_mnist
    from fastkd.data.detection.coco import write_coco_beton
    from fastkd.data.sources.scenes import ScenesConfig, write_fashion_scenes

    try:
        fashion_mnist.locate(download_ok=False)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST (Debian dataset-fashion-mnist) not installed")
    scenes = tmp_path / "fs"
    write_fashion_scenes(str(scenes), ScenesConfig(train=0, val=9, seed=1))
    gt = str(scenes / "annotations" / "instances_val.json")
    beton = str(tmp_path / "val.beton")
    write_coco_beton(str(scenes / "val"), gt, beton, num_workers=1)
    script = tmp_path / "eval.py"
    script.write_text(_SCRIPT)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run(script, [beton, gt, one], 1, tmp_path)
    _run(script, [beton, gt, two], 2, tmp_path)
    m1 = json.load(open(one + ".rank0.json"))
    m2 = [json.load(open(f"{two}.rank{r}.json")) for r in range(2)]
    assert m2[0] == m2[1] == m1                      # every rank returns the same dict, equal to 1 process
    assert 0.2 < m1["bbox_AP"] < 0.95                # imperfect predictions: a test that can fail
    r1, r2 = json.load(open(one + ".results.json")), json.load(open(two + ".results.json"))
    assert sorted(map(json.dumps, r1)) == sorted(map(json.dumps, r2))
    assert coco_metrics(r2, gt) == m1


def test_empty_predictions_and_unknown_images(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
                              "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4],
                                               "area": 16, "iscrowd": 0}],
                              "categories": [{"id": 1, "name": "x"}]}))
    assert evaluate_coco([], str(gt))["bbox_AP"] == 0.0
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9}]
    assert evaluate_coco(perfect, str(gt), results_path=str(tmp_path / "r.json"))["bbox_AP"] == pytest.approx(1.0)
    assert json.load(open(tmp_path / "r.json")) == perfect
    with pytest.raises(ValueError, match="image ids \\[7\\] are not in the ground truth"):
        evaluate_coco(perfect, str(gt), image_ids=[1, 7])


def _dense_scene(tmp_path, n=150):
    """One image with ``n`` objects on a grid, most of one category (COCO's limit counts per image and
    category: more than 100 of it); predictions: every box slightly shifted, a few confused, scores
    falling with the index."""
    import numpy as np

    rng = np.random.default_rng(0)
    anns, results = [], []
    for i in range(n):
        x, y = 20 * (i % 15) + 2, 20 * (i // 15) + 2
        cat = 2 if i % 10 == 0 else 1
        anns.append({"id": i + 1, "image_id": 1, "category_id": cat, "bbox": [x, y, 12, 12], "area": 144,
                     "iscrowd": 0})
        dx, dy = rng.normal(0, 1.5, 2)
        results.append({"image_id": 1, "category_id": cat if i % 25 != 3 else 3 - cat, "bbox": [x + dx, y + dy, 12, 12],
                        "score": 1.0 - i / (2 * n)})
    gt = tmp_path / "dense.json"
    gt.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "height": 320, "width": 320}],
                              "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return str(gt), results


def _pycocotools_at(gt_path, results, limit):
    """pycocotools' own numbers at ``limit`` detections per image, run separately: evaluate and accumulate
    with ``params.maxDets = [1, 2, limit]``, then let ``summarize`` read the third column under the label
    100 that it looks up (its AP lines take the last column; only its first line asks for 100 by value)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        ev = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
        ev.params.maxDets = [1, 2, limit]
        ev.evaluate()
        ev.accumulate()
        ev.params.maxDets = [1, 10, 100]
        ev.summarize()
    return [float(v) for v in ev.stats[:6]]


@pytest.mark.parametrize("limit", [5, 100, 300])
def test_ap_at_a_max_dets_other_than_100_is_pycocotools_at_that_limit(tmp_path, limit):
    gt, results = _dense_scene(tmp_path)
    m = coco_metrics(results, gt, max_dets=limit)
    expected = _pycocotools_at(gt, results, limit)
    assert [m[k] for k in ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl")] == expected
    assert m["bbox_max_dets"] == limit
    assert m["bbox_AP"] > 0  # not pycocotools' "-1" of a limit its summary does not know
    if limit == 100:  # the default is COCOeval's plain summary, bit for bit
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(gt)
            ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert expected == [float(v) for v in ev.stats[:6]]
    # 135 objects of one category in one image: a limit of 100 caps recall, 300 does not
    assert coco_metrics(results, gt, max_dets=300)["bbox_AP50"] > coco_metrics(results, gt)["bbox_AP50"] + 0.05


def test_detection_log_line_names_the_limit():
    from fastkd.tasks.detection import DetectionTask

    line = DetectionTask().describe({"bbox_AP": 0.5, "bbox_AP50": 0.7, "bbox_AP75": 0.4, "bbox_APs": -1.0,
                                     "bbox_APm": 0.5, "bbox_APl": 0.6, "bbox_max_dets": 300.0})
    assert line.startswith("bbox_AP 0.5 bbox_AP50 0.7") and line.endswith("(maxDets 300)")


@pytest.mark.parametrize("max_dets", [0, 2.5, "300"])
def test_bad_max_dets_is_refused_before_training(max_dets):
    from fastkd.config import Config, ConfigError, DataConfig, ModelConfig
    from fastkd.tasks.detection import DetectionTask

    cfg = Config(task="detection", student=ModelConfig(name="retinanet_resnet18_fpn", num_classes=3),
                 data=DataConfig(kwargs={"max_dets": max_dets}))
    with pytest.raises(ConfigError, match="data.kwargs.max_dets: .* must be an integer >= 1"):
        DetectionTask(cfg).preflight()
    DetectionTask(Config(task="detection", student=cfg.student, data=DataConfig(kwargs={"max_dets": 300}))).preflight()
