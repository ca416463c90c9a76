"""The detection task plug-in: student / teacher forwards on DetectionBatch-shaped batches, teacher
loading from a whole-detector checkpoint, student initialisation, and the COCO recipes."""
from __future__ import annotations

import glob
import os
from types import SimpleNamespace

import pytest
import torch
import yaml

pytest.importorskip("torchvision.ops", reason="torchvision does not import here")
pytest.importorskip("fastkd.tasks.base", reason="the task interface (fastkd.tasks.base) is not in this checkout")

from fastkd.config import ConfigError, KDConfig, ModelConfig  # noqa: E402
from fastkd.tasks.detection.models import build_detector, fpn_level_names  # noqa: E402
from fastkd.tasks.detection.forward import fpn_features, train_forward  # noqa: E402
from fastkd.tasks.detection import DetectionTask  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(fpn_channels=32, anchor_sizes=[8, 16, 32, 64, 128], min_size=64, max_size=96)


def batch(with_crowd: bool = False):
    """A DetectionBatch-shaped batch (normalised images padded to 64x96, targets in resized pixels)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=g)
    images[1, :, :, 80:] = 0  # image 1 is 64x80, padded on the right
    boxes0 = [[4.0, 6.0, 40.0, 50.0], [30.0, 5.0, 90.0, 40.0]] + ([[0.0, 0.0, 60.0, 60.0]] if with_crowd else [])
    targets = [
        {"boxes": torch.tensor(boxes0), "labels": torch.tensor([1, 3] + ([2] if with_crowd else [])),
         "iscrowd": torch.tensor([0, 0] + ([1] if with_crowd else []), dtype=torch.uint8), "image_id": 1,
         "orig_size": (128, 192), "size": (64, 96), "scale": 0.5, "flipped": False},
        {"boxes": torch.tensor([[5.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([2]),
         "iscrowd": torch.tensor([0], dtype=torch.uint8), "image_id": 2, "orig_size": (64, 80), "size": (64, 80),
         "scale": 1.0, "flipped": True}]
    return SimpleNamespace(images=images, targets=targets)


def model_cfg(name: str, **kwargs) -> ModelConfig:
    return ModelConfig(name=name, num_classes=4, kwargs={**SMALL, **kwargs})


@pytest.mark.parametrize("name", ["retinanet_resnet18_fpn", "fasterrcnn_resnet18_fpn"])
def test_student_forward_drops_crowd_boxes(name):
    task = DetectionTask(None)
    torch.manual_seed(0)
    student = task.build_model(model_cfg(name), "student").train()
    b = batch(with_crowd=True)
    torch.manual_seed(1)
    losses, logits, feats = task.student_forward(student, b)
    assert logits is None and list(losses) == task.loss_names(student)
    assert list(feats) == fpn_level_names(student.backbone)
    plain = batch(with_crowd=False)
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in plain.targets]
    torch.manual_seed(1)
    want, _ = train_forward(student, plain.images, [(64, 96), (64, 80)], targets)
    for k in want:
        torch.testing.assert_close(losses[k], want[k], rtol=0, atol=0)


def test_teacher_loads_backbone_of_a_whole_detector(tmp_path):
    torch.manual_seed(0)
    full = build_detector("retinanet_resnet18_fpn", num_classes=4, **SMALL).eval()
    path = tmp_path / "detector.pt"
    torch.save(full.state_dict(), path)
    task = DetectionTask(None)
    mcfg = ModelConfig(name="retinanet_resnet18_fpn", num_classes=4, checkpoint=str(path), kwargs=SMALL)
    teacher = task.load_teacher(mcfg, torch.device("cpu"))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not any(k.startswith("head.") for k in teacher.state_dict())
    b = batch()
    logits, feats = task.teacher_forward(teacher, b, ["fpn.p3", "fpn.p7"])
    with torch.no_grad():
        want = fpn_features(full, b.images)
    assert logits is None and list(feats) == ["fpn.p3", "fpn.p7"]
    assert all(torch.equal(feats[k], want[k]) for k in feats)
    with pytest.raises(ConfigError, match="no FPN level 'fpn.p2'"):
        task.teacher_forward(teacher, b, ["fpn.p2"])
    headless = tmp_path / "head.pt"
    torch.save({"head.w": torch.zeros(1)}, headless)
    with pytest.raises(ConfigError, match=f"{headless}.*no backbone"):
        task.load_teacher(ModelConfig(name="retinanet_resnet18_fpn", num_classes=4, checkpoint=str(headless),
                                      kwargs=SMALL), torch.device("cpu"))


def test_student_initialisation(tmp_path):
    torch.manual_seed(0)
    donor = build_detector("retinanet_resnet18_fpn", num_classes=4, **SMALL)
    det_path = tmp_path / "teacher.pt"
    torch.save(donor.state_dict(), det_path)
    imagenet = {k: v for k, v in donor.backbone.body.state_dict().items()}
    imagenet["fc.weight"] = torch.zeros(1000, 512)  # a classifier's head, ignored
    cls_path = tmp_path / "resnet18.pth"
    torch.save(imagenet, cls_path)
    task = DetectionTask(None)
    torch.manual_seed(1)
    student = task.build_model(model_cfg("retinanet_resnet18_fpn", init_backbone=str(cls_path),
                                         init_neck_head=str(det_path)), "student")
    for k, v in donor.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="init_neck_head"):
        task.build_model(ModelConfig(name="retinanet_resnet18_fpn", num_classes=7,  # other classes: other logits
                                     kwargs={**SMALL, "init_neck_head": str(det_path)}), "student")
    with pytest.raises(ConfigError, match="only a student"):
        task.build_model(model_cfg("retinanet_resnet18_fpn", init_backbone=str(cls_path)), "teacher")


def _structure(model):
    """What training changes in a backbone: which parameters train, and the norm layers' kinds."""
    body = model.backbone.body
    return ({n: p.requires_grad for n, p in body.named_parameters()},
            {n: type(m).__name__ for n, m in body.named_modules() if "bn" in n.split(".")[-1] or n.endswith(".1")})


@pytest.mark.parametrize("name, factory", [("retinanet_resnet50_fpn", "retinanet_resnet50_fpn"),
                                           ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn"),
                                           ("retinanet_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2")])
def test_student_from_scratch_trains_its_whole_backbone_as_torchvision_does(name, factory):
    """Without pretrained weights torchvision's factories train every stage with trainable BatchNorm (they
    freeze the stem, layer1 and the statistics only for pretrained weights): a student from scratch is built
    the same way; one with init_backbone keeps the pretrained structure (FrozenBatchNorm2d in v1, 3 stages)."""
    import warnings

    from torchvision.models import detection as tvd

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about with the defaults
        ours = DetectionTask(None).build_model(ModelConfig(name=name, num_classes=4), "student")
    theirs = getattr(tvd, factory)(weights=None, weights_backbone=None, num_classes=4)
    assert _structure(ours) == _structure(theirs)
    assert all(_structure(ours)[0].values())


def test_student_with_pretrained_backbone_keeps_frozen_stages_and_explicit_freezing_warns(tmp_path):
    cls_path = tmp_path / "resnet18.pth"
    torch.save(build_detector("retinanet_resnet18_fpn", num_classes=4, **SMALL).backbone.body.state_dict(), cls_path)
    task = DetectionTask(None)
    pretrained = task.build_model(model_cfg("retinanet_resnet18_fpn", init_backbone=str(cls_path)), "student")
    grads, norms = _structure(pretrained)
    assert not grads["conv1.weight"] and not grads["layer1.0.conv1.weight"] and grads["layer2.0.conv1.weight"]
    assert norms["bn1"] == "FrozenBatchNorm2d"
    with pytest.warns(UserWarning, match="trainable_backbone_layers=3 freezes part of a backbone that starts from "
                                         "random weights"):
        frozen = task.build_model(model_cfg("retinanet_resnet18_fpn", trainable_backbone_layers=3), "student")
    assert not _structure(frozen)[0]["conv1.weight"] and _structure(frozen)[1]["bn1"] == "BatchNorm2d"


def test_no_logit_loss():
    task = DetectionTask(None)
    assert task.logit_loss(None, "auto") is None
    with pytest.raises(ConfigError, match="distill.kd"):
        task.logit_loss(KDConfig(), "auto")


def _recipe_model(mcfg: dict, role: str):
    kwargs = {k: v for k, v in (mcfg.get("kwargs") or {}).items() if not k.startswith("init_")}
    return build_detector(mcfg["name"], num_classes=mcfg["num_classes"], features_only=True, **kwargs)


def test_coco_recipes_pair_fpn_levels_and_carry_the_published_numbers():
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "coco", "*.yaml")))
    assert len(paths) == 6
    levels = {}
    for path in paths:
        with open(path) as f:
            text = f.read()
        raw = yaml.safe_load(text)
        assert raw["task"] == "detection", path
        student = raw["student"]["name"]
        published = ("37.4",) if student.startswith("retinanet") else ("38.4",)
        if raw.get("teacher"):
            published += ("41.0",) if student.startswith("retinanet") else ("42.1", "+3.9")
        assert all(n in text for n in published), (path, published)
        roles = [("student", raw["student"])] + ([("teacher", raw["teacher"])] if raw.get("teacher") else [])
        for role, mcfg in roles:
            key = (mcfg["name"], repr(sorted((mcfg.get("kwargs") or {}).items())))
            if key not in levels:
                levels[key] = fpn_level_names(_recipe_model(mcfg, role).backbone)
        pairs = (raw.get("distill") or {}).get("pairs", [])
        want = ["fpn.p3", "fpn.p4", "fpn.p5", "fpn.p6", "fpn.p7"] if student.startswith("retinanet") else \
            ["fpn.p2", "fpn.p3", "fpn.p4", "fpn.p5"]
        if raw.get("teacher"):
            assert [p["student"] for p in pairs] == want == [p["teacher"] for p in pairs], path
            s_key = (raw["student"]["name"], repr(sorted((raw["student"].get("kwargs") or {}).items())))
            t_key = (raw["teacher"]["name"], repr(sorted((raw["teacher"].get("kwargs") or {}).items())))
            assert set(want) <= set(levels[s_key]) and set(want) <= set(levels[t_key])
