"""Every YAML recipe in configs/ loads and validates; the ImageNet recipes carry METHODS.md's numbers
and their feature pairs fit the models they name."""
import glob
import os

import pytest
import torch

from fastkd.config import load_config
from fastkd.distill import check_pairs
from fastkd.models.loading import build_model, load_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAMLS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
IMAGENET = sorted(glob.glob(os.path.join(REPO, "configs", "imagenet", "*.yaml")))
DEMO = sorted(glob.glob(os.path.join(REPO, "configs", "demo", "*.yaml")))


def test_the_recipes_are_there():
    names = {os.path.relpath(p, REPO) for p in YAMLS}
    for n in ("teacher", "baseline", "mgd", "ct", "mgd_kd"):
        assert f"configs/demo/{n}.yaml" in names
    for n in ("r34_r18_mgd", "r50_mbv1_mgd", "r50_mbv1_ct", "r18_baseline", "mbv1_baseline"):
        assert f"configs/imagenet/{n}.yaml" in names
    assert os.path.isfile(os.path.join(REPO, "configs", "imagenet", "hostfile.example"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_yaml_loads_and_validates(path):
    cfg = load_config(path)
    assert os.path.isfile(os.path.join(REPO, cfg.deepspeed.config))
    if cfg.teacher is None:
        assert not cfg.distill.pairs and cfg.distill.kd is None


@pytest.mark.parametrize("path", IMAGENET, ids=os.path.basename)
def test_imagenet_recipes_follow_methods(path, tmp_path):
    ckpt = str(tmp_path / "teacher.pth")
    baseline = "baseline" in os.path.basename(path)
    cfg = load_config(path, [] if baseline else [f"teacher.checkpoint={ckpt}", "data.path=/data/in1k"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert (cfg.schedule.name, list(cfg.schedule.milestones), cfg.schedule.gamma) == ("step", [30, 60, 90], 0.1)
    assert cfg.schedule.warmup_epochs == 0 and cfg.schedule.warmup_steps is None
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.image_size, cfg.data.source) == (100, 256, 224, "ffcv")
    mbv1 = cfg.student.name == "mobilenet_v1"
    assert cfg.train.grad_clip == (5.0 if mbv1 else 0.0)
    assert cfg.student.name in ("resnet18", "mobilenet_v1") and cfg.student.num_classes == 1000
    if baseline:
        assert cfg.teacher is None and not cfg.distill.pairs and cfg.distill.kd is None
        return
    assert cfg.teacher.checkpoint == ckpt and cfg.data.path == "/data/in1k"
    assert cfg.teacher.name == ("resnet50" if mbv1 else "resnet34")
    (pair,) = cfg.distill.pairs
    assert (pair.student, pair.teacher) == ("model.13" if mbv1 else "layer4", "layer4")
    if pair.loss == "mgd":
        assert (pair.mask, pair.ratio, pair.alpha) == ("channel", 0.15, 7e-5)
    assert cfg.distill.kd is None and cfg.distill.label_smoothing == 0.0


def _pairs_fit(cfg, size):
    x = torch.randn(2, cfg.student.in_channels, size, size)
    with torch.no_grad():
        _, s = build_model(cfg.student, "student").eval()(x, features=True)
        _, t = build_model(cfg.teacher, "teacher").eval()(x, features=True)
    return check_pairs(cfg.distill.pairs, s, t)


@pytest.mark.parametrize("name", ["r34_r18_mgd", "r50_mbv1_mgd", "r50_mbv1_ct"])
def test_imagenet_pairs_fit_the_models(name):
    cfg = load_config(os.path.join(REPO, "configs", "imagenet", f"{name}.yaml"))
    (spec,) = _pairs_fit(cfg, 64)  # stride 32 on both sides: 2x2 maps at 64 px (7x7 at 224)
    assert (spec.student_channels, spec.teacher_channels) == ((512, 512) if "r18" in name else (1024, 2048))


@pytest.mark.parametrize("name", ["mgd", "ct", "mgd_kd"])
def test_demo_pairs_fit_the_models(name):
    cfg = load_config(os.path.join(REPO, "configs", "demo", f"{name}.yaml"))
    specs = _pairs_fit(cfg, 28)
    expected = [(32, 64)] if name == "ct" else [(16, 32), (32, 64)]  # MGD: stage2 and stage3; CT: stage3
    assert [(s.student_channels, s.teacher_channels) for s in specs] == expected


def test_imagenet_teacher_takes_a_torchvision_format_checkpoint(tmp_path):
    """A state_dict with torchvision's key names (as torchvision's own resnet34 file) loads strictly."""
    from fastkd.models import build
    ref = build("resnet34", 1000)
    state = ref.state_dict()
    assert "layer4.2.bn2.running_var" in state and "fc.weight" in state  # torchvision's names
    torch.save(state, tmp_path / "resnet34.pth")
    cfg = load_config(os.path.join(REPO, "configs", "imagenet", "r34_r18_mgd.yaml"),
                      [f"teacher.checkpoint={tmp_path / 'resnet34.pth'}"])
    teacher = load_teacher(cfg.teacher, torch.device("cpu"))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert torch.equal(teacher.state_dict()["fc.weight"], state["fc.weight"])
