"""Segmentation through the one trainer: MGD + channel-wise logit KD on fashion-scenes label maps;
two processes equal one (with grad_accum 2), and a resumed run continues exactly."""
import os

import pytest
import torch
import yaml

from fastkd import models
from fastkd.tasks.segmentation.models import MODELS
from tests.test_engine_deepspeed import _ok, fastkd, metrics
from tests.test_seg_data import write_scenes

pytestmark = [pytest.mark.slow]

# dropout 0: Dropout2d draws from each process's own RNG, the one thing a split changes
STUDENT = {"base_channels": 8, "channels": 8, "aux_channels": 8, "dropout": 0.0}
TEACHER = {"base_channels": 16, "channels": 16, "aux_channels": 8}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("seg")
    write_scenes(str(d / "scenes"), "train", 16)
    write_scenes(str(d / "scenes"), "val", 5)
    torch.manual_seed(0)
    torch.save(models.build("pspnet_r18", num_classes=11, zoo=MODELS, **TEACHER).state_dict(), d / "teacher.pt")
    cfg = {"task": "segmentation", "seed": 3,
           "student": {"name": "pspnet_r18", "num_classes": 11, "kwargs": STUDENT},
           "teacher": {"name": "pspnet_r18", "num_classes": 11, "checkpoint": str(d / "teacher.pt"), "kwargs": TEACHER},
           "data": {"source": "fashion-scenes", "path": str(d / "scenes"), "image_size": 32, "num_workers": 0,
                    "kwargs": {"img_scale": [56, 40]}},
           "distill": {"pairs": [{"student": "layer4", "teacher": "layer4", "loss": "mgd", "ratio": 0.75,
                                  "alpha": 2.0e-5}], "kd": {"alpha": 3.0, "temperature": 4.0}},
           "optim": {"name": "sgd", "lr": 0.01, "weight_decay": 5.0e-4},
           "schedule": {"name": "poly", "power": 0.9, "min_lr": 1.0e-4},
           "train": {"epochs": 2, "max_steps": 4, "batch_size": 4, "progress": False, "log_every": 1,
                     "eval_every": 0, "eval_teacher": False},
           "deepspeed": {"config": os.path.join(os.getcwd(), "configs", "deepspeed", "zero0.json")}}
    with open(d / "seg.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    return d


def train(work, name, *overrides, procs=1):
    return _ok(fastkd("train", str(work / "seg.yaml"), f"run_dir={work / name}", *overrides, cwd=work, procs=procs))


KEYS = ("loss/total", "loss/ce", "loss/aux_ce", "loss/kd", "loss/mgd.layer4", "lr")


def test_two_processes_equal_one_and_resume_is_exact(work):
    one = train(work, "one", "train.grad_accum=2")
    assert "val mIoU" in one.stdout + one.stderr
    train(work, "two", procs=2)
    a, b = metrics(work / "two"), metrics(work / "one")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for key in KEYS:
        for ra, rb in zip(a, b):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (key, ra["step"], ra[key], rb[key])
    (ea,), (eb,) = metrics(work / "two", "eval"), metrics(work / "one", "eval")
    assert ea["val/pixels"] == eb["val/pixels"] > 0 and 0 <= ea["val/mIoU"] <= 100
    # fastkd eval on the trained student: the trainer's final evaluation, on the same model
    res = _ok(fastkd("eval", str(work / "seg.yaml"), f"run_dir={work / 'one'}", cwd=work))
    assert f"mIoU {eb['val/mIoU']:.2f}" in res.stdout
    # stop after 2 steps, resume, finish: the same 4 steps as one uninterrupted run
    train(work, "resumed", "train.grad_accum=2", "train.session_steps=2")
    train(work, "resumed", "train.grad_accum=2")
    c = [r for r in metrics(work / "resumed") if r["step"] > 2]
    for key in KEYS:
        for rc, rb in zip(c, b[2:]):
            assert rc[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-8), (key, rc["step"], rc[key], rb[key])
