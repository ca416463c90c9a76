"""Detection through the one trainer on Fashion-MNIST scenes (COCO JSON -> .beton -> loader -> RetinaNet
-> pycocotools): MGD + CT on FPN levels, two processes equal one, a resumed run continues exactly,
``fastkd eval`` gives the trainer's AP, and the exported student loads strictly.

One process runs micro-batches of 4, two run 2 each, and one process accumulates two micro-batches of 2:
the detection loader groups each optimizer step's grad_accum x world x micro images by orientation and
hands micro-step m of rank r chunk m x world + r, so all three see the same steps (frozen BatchNorm)."""
import os

import pytest
import torch
import yaml

pytest.importorskip("torchvision.ops", reason="torchvision does not import here")
pytest.importorskip("fastkd.data.detection.loader", reason="the COCO detection loader is not in this checkout")

from fastkd.cli import main as cli_main  # noqa: E402
from fastkd.tasks.detection.models import build_detector  # noqa: E402
from tests.test_engine_deepspeed import _ok, fastkd, metrics  # noqa: E402

pytestmark = [pytest.mark.slow]

SIZES = {"fpn_channels": 32, "anchor_sizes": [16, 32, 64, 128, 256]}
# frozen BatchNorm (the recipes', with their pretrained backbone; asked for explicitly here, as this student
# starts from random weights): no batch statistics, so a split of the batch changes nothing
STUDENT = {**SIZES, "detections_per_img": 100, "frozen_bn": True, "trainable_backbone_layers": 3}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("det")
    assert cli_main(["data", "write", "fashion-scenes", str(d / "scenes"), "--train", "16", "--val", "6"]) == 0
    for split in ("train", "val"):
        assert cli_main(["data", "write", "coco", "--images", str(d / "scenes" / split), "--annotations",
                         str(d / "scenes" / "annotations" / f"instances_{split}.json"), str(d / f"{split}.beton")]) == 0
    torch.manual_seed(0)
    torch.save(build_detector("retinanet_resnet34_fpn", num_classes=11, **SIZES).state_dict(), d / "teacher.pt")
    cfg = {"task": "detection", "seed": 3,
           "student": {"name": "retinanet_resnet18_fpn", "num_classes": 11, "kwargs": STUDENT},
           "teacher": {"name": "retinanet_resnet34_fpn", "num_classes": 11, "checkpoint": str(d / "teacher.pt"),
                       "kwargs": SIZES},
           "data": {"source": "torch", "path": str(d / "train.beton"), "val_path": str(d / "val.beton"),
                    "num_workers": 0, "kwargs": {"min_size": 96, "max_size": 160}},
           "distill": {"pairs": [
               {"student": "fpn.p3", "teacher": "fpn.p3", "loss": "mgd", "ratio": 0.65, "alpha": 2.0e-5},
               {"student": "fpn.p4", "teacher": "fpn.p4", "loss": "ct", "alpha": 2.0e-6}]},
           "optim": {"name": "sgd", "lr": 0.01},
           "schedule": {"name": "constant"},
           "train": {"epochs": 2, "max_steps": 4, "batch_size": 4, "grad_clip": 35.0, "progress": False,
                     "log_every": 1, "eval_every": 0, "eval_teacher": False},
           "deepspeed": {"config": os.path.join(os.getcwd(), "configs", "deepspeed", "zero0.json")}}
    with open(d / "det.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    return d


def train(work, name, *overrides, procs=1):
    return _ok(fastkd("train", str(work / "det.yaml"), f"run_dir={work / name}", *overrides, cwd=work,
                      procs=procs, timeout=600))


KEYS = ("loss/total", "loss/classification", "loss/bbox_regression", "loss/mgd.fpn.p3", "loss/ct.fpn.p4")


def test_two_processes_equal_one_resume_eval_export(work):
    train(work, "one")
    b = metrics(work / "one")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r[k] for k in KEYS])).all() for r in b)
    (eb,) = metrics(work / "one", "eval")
    assert 0 <= eb["val/bbox_AP"] <= 1
    train(work, "two", procs=2)
    train(work, "accum", "train.grad_accum=2")
    for other in ("two", "accum"):
        a = metrics(work / other)
        assert len(a) == len(b)
        for key in KEYS:
            for ra, rb in zip(a, b):
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (other, key, ra["step"], ra[key], rb[key])
    # fastkd eval on the trained student: the trainer's final evaluation, on the same model
    res = _ok(fastkd("eval", str(work / "det.yaml"), f"run_dir={work / 'one'}", cwd=work))
    assert f"bbox_AP {eb['val/bbox_AP']:.4g} " in res.stdout
    # stop after 2 steps, resume, finish: the same 4 steps as one uninterrupted run
    train(work, "resumed", "train.session_steps=2")
    train(work, "resumed")
    c = [r for r in metrics(work / "resumed") if r["step"] > 2]
    for key in KEYS:
        for rc, rb in zip(c, b[2:]):
            assert rc[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-8), (key, rc["step"], rc[key], rb[key])
    # the student alone, in torchvision's keys, loads strictly into the same detector
    _ok(fastkd("export", str(work / "one"), "--out", str(work / "student.pt"), cwd=work))
    student = build_detector("retinanet_resnet18_fpn", num_classes=11, **STUDENT)
    student.load_state_dict(torch.load(work / "student.pt", weights_only=True), strict=True)


def test_moved_ground_truth_is_one_message_before_training(work):
    """Evaluation reads the annotations file recorded in the val .beton's sidecar: moved away, `fastkd train`
    and `fastkd eval` stop at start-up with one message naming it (exit 2), not after training."""
    gt = work / "scenes" / "annotations" / "instances_val.json"
    gt.rename(str(gt) + ".moved")
    try:
        for args in (("train", str(work / "det.yaml"), f"run_dir={work / 'no_gt'}"),
                     ("eval", str(work / "det.yaml"), "--weights", str(work / "teacher.pt"))):
            res = fastkd(*args, cwd=work)
            assert res.returncode == 2, res.stderr[-3000:]
            assert "Traceback" not in res.stderr, res.stderr[-3000:]
            (line,) = [x for x in res.stderr.splitlines() if x.startswith("fastkd: error")]
            assert f"ground truth {gt} not found" in line and f"{work / 'val.beton'}.json" in line, line
        assert not (work / "no_gt").exists()  # nothing started
    finally:
        os.rename(str(gt) + ".moved", gt)
