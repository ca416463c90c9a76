"""``tv:`` / ``timm:`` models for real (torchvision and timm import in the project's environment).

The native ResNets use torchvision's key names, so a native state_dict loads into ``tv:resnet18`` and
both must compute the same logits and stage features: that pins the adapter to the real library.
"""
import pytest
import torch

from fastkd.config import DistillConfig, PairConfig
from fastkd.distill import Distiller, build_losses, check_pairs
from fastkd.models import build
from fastkd.tasks.classification import ClassificationTask

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")


def test_tv_resnet18_matches_the_native_one_on_the_same_weights():
    torch.manual_seed(0)
    native = build("resnet18", num_classes=10).eval()
    tv = build("tv:resnet18", num_classes=10, input_size=(3, 64, 64)).eval()
    assert tv.feature_channels == {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    assert tv.feature_reductions == {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
    tv.model.load_state_dict(native.state_dict(), strict=True)  # same key names, same shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref_logits, ref_feats = native(x, features=True)
        logits, feats = tv(x, features=True)
    torch.testing.assert_close(logits, ref_logits)
    for k in ref_feats:
        torch.testing.assert_close(feats[k], ref_feats[k])


def test_timm_model_features_from_feature_info():
    model = build("timm:resnet18", num_classes=7, input_size=(3, 64, 64))
    assert list(model.feature_channels) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert model.feature_channels["layer4"] == 512 and model.feature_reductions["layer4"] == 32
    logits, feats = model(torch.randn(2, 3, 64, 64), features=True)
    assert logits.shape == (2, 7) and feats["layer3"].shape == (2, 256, 4, 4)
    # The exported student carries timm's own keys (the adapter adds only "model.").
    assert all(k.startswith("model.") for k in model.state_dict())


def test_timm_student_distilled_from_a_tv_teacher():
    torch.manual_seed(0)
    teacher = build("tv:resnet18", num_classes=10, input_size=(3, 64, 64)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build("timm:mobilenetv3_small_050", num_classes=10, input_size=(3, 64, 64),
                    feature_layers=["blocks.5"])
    cfg = DistillConfig(pairs=[PairConfig(student="blocks.5", teacher="layer4", loss="mgd", alpha=1e-5,
                                          mask="channel", ratio=0.5)], backend="reference")
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    with torch.no_grad():
        student.eval()
        s_feats = student(x, features=True)[1]
        student.train()
    specs = check_pairs(cfg.pairs, s_feats, teacher(x, features=True)[1])
    assert (specs[0].student_channels, specs[0].teacher_channels) == (s_feats["blocks.5"].shape[1], 512)
    d = Distiller(student, teacher, specs, build_losses(specs, seed=0, backend="reference"), cfg,
                  task=ClassificationTask(label_smoothing=cfg.label_smoothing))
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)  # scale-free: the tiny-alpha generator learns too
    first = None
    for _ in range(8):
        t_logits, t_feats = d.teacher_forward(x)
        out = d((x, y), t_logits, t_feats, d.next_seeds(), 0, 1.0)
        first = first if first is not None else {k: v.item() for k, v in out.items()}
        opt.zero_grad()
        out["total"].backward()
        opt.step()
    assert out["mgd.blocks.5"].item() < first["mgd.blocks.5"] and out["ce"].item() < first["ce"]
    assert all(p.grad is None for p in teacher.parameters())
