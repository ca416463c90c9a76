"""The Cityscapes recipes: DENSE.md's hyper-parameters, published numbers in the headers, pairs that fit."""
import glob
import os

import pytest
import torch

from fastkd.config import load_config
from fastkd.distill import check_pairs
from fastkd.tasks.segmentation import SegmentationTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITYSCAPES = sorted(glob.glob(os.path.join(REPO, "configs", "cityscapes", "*.yaml")))
PUBLISHED = {"pspnet_r18_baseline": "69.85", "deeplabv3_r18_baseline": "73.20",
             "pspnet_r101_r18_mgd": "69.85 -> 73.63", "pspnet_r101_deeplabv3_r18_mgd": "73.20 -> 76.31",
             "pspnet_r101_r18_ct": "+4.66"}


def test_all_five_recipes_are_there():
    assert sorted(os.path.basename(p)[:-5] for p in CITYSCAPES) == sorted(PUBLISHED)


@pytest.mark.parametrize("path", CITYSCAPES, ids=os.path.basename)
def test_recipe_follows_dense_md(path):
    name = os.path.basename(path)[:-5]
    with open(path) as f:
        assert PUBLISHED[name] in f.read().split("\ntask:")[0]  # the number sits in the header
    cfg = load_config(path)
    assert cfg.task == "segmentation" and cfg.student.num_classes == 19
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (cfg.schedule.name, cfg.schedule.power, cfg.schedule.min_lr) == ("poly", 0.9, 1e-4)
    # every student starts from mmseg's ImageNet backbone (open-mmlab://resnet18_v1c)
    assert cfg.student.kwargs["init_backbone"] == "checkpoints/resnet18_v1c-b5776b93.pth"
    assert cfg.train.max_steps == 40000 and 8 <= cfg.train.batch_size <= 16 and cfg.train.sync_bn
    kw = cfg.data.kwargs
    assert (kw["crop_size"], kw["ratio_range"], kw["cat_max_ratio"], kw["img_scale"]) == (
        [512, 512], [0.5, 2.0], 0.75, [2048, 1024])
    if "baseline" in name:
        assert cfg.teacher is None
        return
    assert cfg.teacher.name == "pspnet_r101"
    (pair,) = cfg.distill.pairs
    assert (pair.student, pair.teacher) == ("layer4", "layer4")
    if pair.loss == "mgd":
        assert (pair.mask, pair.ratio, pair.alpha) == ("spatial", 0.75, 2e-5)
        assert (cfg.distill.kd.alpha, cfg.distill.kd.temperature) == (3.0, 4.0)


@pytest.mark.parametrize("path", [p for p in CITYSCAPES if "baseline" not in p], ids=os.path.basename)
def test_pairs_fit_the_models(path):
    cfg = load_config(path, ["student.kwargs={}"])  # shapes only: no ImageNet weights to load
    with torch.device("meta"):  # shapes only: the 68 M-parameter teacher costs nothing there
        task = SegmentationTask(cfg)
        student, teacher = task.build_model(cfg.student, "student").eval(), task.build_model(cfg.teacher, "teacher").eval()
        x = torch.empty(2, 3, 48, 48)
    with torch.no_grad():
        s_logits, s_feats = student(x, features=True)
        t_logits, t_feats = teacher(x, features=True)
    (spec,) = check_pairs(cfg.distill.pairs, s_feats, t_feats)
    assert (spec.student_channels, spec.teacher_channels) == (512, 2048)
    assert s_logits.shape == t_logits.shape == (2, 19, 6, 6)  # the logit loss compares them
