"""The segmentation demo: its configs, the small scenes it writes, and the whole demo shrunk to a few steps.

Same driver, same configs as ``python -m fastkd.demos.segmentation``; only the sizes are overridden.
"""
import json
import os

import numpy as np
import pytest
import torch

from fastkd import models
from fastkd.demos import segmentation as demo_seg
from fastkd.config import load_config
from fastkd.data.sources import fashion_mnist
from fastkd.data.sources.scenes import CANVASES, ScenesConfig, render_scene
from fastkd.tasks.segmentation.models import MODELS

pytestmark = pytest.mark.usefixtures("restore_environ")


def _fashion_mnist():
    try:
        return fashion_mnist.locate(download_ok=False)
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed ({exc}); `make sysdeps` installs it")


def test_demo_configs_validate_and_agree():
    cfgs = {n: load_config(os.path.join(demo_seg.config_dir(), f"{n}.yaml")) for n in demo_seg.RUNS}
    assert all(c.task == "segmentation" and c.data.source == "ffcv" for c in cfgs.values())
    teacher = cfgs["teacher"].student
    for name in demo_seg.STUDENTS:  # one student, one schedule, one data pipeline
        c = cfgs[name]
        assert c.student == cfgs["baseline"].student and c.student.num_classes == teacher.num_classes == 11
        assert c.data == cfgs["teacher"].data and c.optim == cfgs["teacher"].optim
        assert c.train == cfgs["baseline"].train and c.train.max_steps <= cfgs["teacher"].train.max_steps
        if name != "baseline":  # the teacher the students read is the model the teacher run trains
            assert (c.teacher.name, c.teacher.kwargs) == (teacher.name, teacher.kwargs)
    assert cfgs["baseline"].teacher is None and not cfgs["baseline"].distill.pairs
    (mgd,), (ct,) = cfgs["mgd"].distill.pairs, cfgs["ct"].distill.pairs
    assert (mgd.loss, mgd.mask, mgd.ratio, mgd.student, mgd.teacher, mgd.alpha) == ("mgd", "spatial", 0.75, "layer4",
                                                                                    "layer4", "auto")
    assert (cfgs["mgd"].distill.kd.alpha, cfgs["mgd"].distill.kd.temperature) == (3.0, 4.0)  # MGD's seg logit loss
    assert (ct.loss, ct.student, ct.teacher, ct.alpha) == ("ct", "layer4", "layer4", "auto")
    assert cfgs["ct"].distill.kd is None
    # the student is narrower than the teacher: MGD's 1x1 align and CT's MLP map 64 -> 128 channels
    s = models.build("pspnet_r18", 11, zoo=MODELS, **cfgs["baseline"].student.kwargs)
    t = models.build("pspnet_r18", 11, zoo=MODELS, **teacher.kwargs)
    assert (s.feature_channels["layer4"], t.feature_channels["layer4"]) == (64, 128)
    assert sum(p.numel() for p in t.parameters()) > 3 * sum(p.numel() for p in s.parameters())


def test_scaled_scenes():
    _fashion_mnist()
    garments, labels = fashion_mnist.load("test")
    small = {tuple(int(round(n * 0.4)) for n in c) for c in CANVASES}
    for i in range(6):
        image, instances, classes = render_scene(garments, labels, seed=1, split="val", index=i, scale=0.4)
        assert image.shape[:2] == instances.shape and instances.shape in small
        assert 1 <= len(classes) <= 8 and set(np.unique(instances)) <= set(range(len(classes) + 1))
    with pytest.raises(ValueError, match="scale"):
        ScenesConfig(scale=0.1)


@pytest.mark.slow
def test_demo_seg_end_to_end(tmp_path, capsys):
    _fashion_mnist()
    data, out = tmp_path / "scenes", tmp_path / "runs"
    argv = ["--device", "cpu", "--data-dir", str(data), "--out", str(out), "--train-scenes", "16",
            "--val-scenes", "4", "--scale", "0.3", "--images", "2", "--threads", "1",
            "train.max_steps=2", "train.batch_size=4", "train.log_every=1", "train.progress=false",
            "data.num_workers=0", "data.image_size=32", "data.kwargs.img_scale=[64,48]"]
    assert demo_seg.main(argv + ["--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 16 train / 4 val fashion-scenes" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results] == ["teacher"] + 2 * ["baseline", "mgd", "ct"]
    assert [r["seed"] - results[0]["seed"] for r in results] == [0] + 3 * [0] + 3 * [1]
    for i, r in enumerate(results):
        assert 0.0 <= r["mIoU"] <= 100.0 and 0.0 <= r["aAcc"] <= 100.0 and r["val_pixels"] > 0
        assert r["steps"] == 2 and r["images"] == 8 and r["images_per_s"] > 0
        assert r["run_dir"] == str(out / (r["name"] + ("_seed1" if i > 3 else "")))
    assert _losses(out / "ct") != _losses(out / "ct_seed1")  # another seed, another run
    assert results[0]["params"] > 3 * results[1]["params"] and len({r["params"] for r in results[1:]}) == 1
    assert set(results[2]["alphas"]) == {"mgd.layer4"} and set(results[3]["alphas"]) == {"ct.layer4"}
    assert not results[1]["alphas"]
    # the exported teacher is the teacher alone, strict-loadable into the model the students' configs name
    teacher = load_config(os.path.join(demo_seg.config_dir(), "mgd.yaml")).teacher
    state = torch.load(out / "teacher.pt", weights_only=True)
    models.build(teacher.name, teacher.num_classes, zoo=MODELS, **teacher.kwargs).load_state_dict(state, strict=True)
    md = (out / "results.md").read_text()
    assert "| mgd | pspnet_r18 (base 8) |" in md and "load average" in md and "torch threads 1" in md
    assert md.strip() in printed
    # mIoU: mean and min-max over the seeds; the verdict line; compare.png
    base = [r["mIoU"] for r in results if r["name"] == "baseline"]
    row = next(line for line in md.splitlines() if line.startswith("| baseline |"))
    seeds = f"{results[1]['seed']},{results[4]['seed']}"
    assert f"| {seeds} | {sum(base) / 2:.2f} | {min(base):.2f}-{max(base):.2f} |" in row
    assert "every method above the baseline by more than the seed spread: " in md and "mean over 2 seeds" in md
    assert (out / "compare.png").stat().st_size > 10000 and str(out / "compare.png") in md
    picture = out / "masks.png"
    assert picture.is_file() and picture.stat().st_size > 5000
    from matplotlib.image import imread
    assert imread(picture).shape[1] > imread(picture).shape[0]  # 2 rows, 6 columns

    # --only reruns one student and reads the others back from their directories
    assert demo_seg.main(argv[:-7] + ["train.max_steps=1", "train.batch_size=4", "train.progress=false",
                                      "data.num_workers=0", "data.image_size=32", "data.kwargs.img_scale=[64,48]",
                                      "--only", "baseline"]) == 0
    assert "present in" in capsys.readouterr().out
    after = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in after] == [r["name"] for r in results[:4]]  # one seed now
    assert [r["steps"] for r in after] == [2, 1, 2, 2] and after[2]["mIoU"] == results[2]["mIoU"]
    assert "seed spread" not in (out / "results.md").read_text()  # one seed: no verdict


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in rows if r["kind"] == "train"]


def test_demo_seg_student_without_teacher_is_a_clear_error(tmp_path, capsys):
    _fashion_mnist()
    argv = ["--device", "cpu", "--data-dir", str(tmp_path / "scenes"), "--out", str(tmp_path / "runs"),
            "--train-scenes", "4", "--val-scenes", "2", "--scale", "0.3", "train.max_steps=1", "train.batch_size=4",
            "data.num_workers=0", "--only", "ct"]
    assert demo_seg.main(argv) == 2
    assert "teacher checkpoint not found" in capsys.readouterr().err
