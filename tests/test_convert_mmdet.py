"""mmdetection ResNet/ResNeXt + FPN (+ DCN) keys -> torchvision's layout, checked against real modules."""
from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("torchvision.ops", reason="torchvision does not import here")

from fastkd.cli import main as cli_main  # noqa: E402
from fastkd.config import ConfigError  # noqa: E402
from fastkd.tasks.detection.convert_mmdet import convert, convert_file, map_keys  # noqa: E402
from fastkd.tasks.detection.models import DeformConv, build_detector  # noqa: E402

BN = ("weight", "bias", "running_mean", "running_var")


def mmdet_name(tv_key: str) -> str:
    """The test's own statement of mmdetection's naming for a torchvision key (backbone + FPN)."""
    rules = [(r"backbone\.body\.(.*)", r"backbone.\1"),
             (r"backbone\.fpn\.inner_blocks\.(\d)\.0\.(.*)", r"neck.lateral_convs.\1.conv.\2"),
             (r"backbone\.fpn\.layer_blocks\.(\d)\.0\.(.*)", r"neck.fpn_convs.\1.conv.\2")]
    for pattern, template in rules:
        if re.fullmatch(pattern, tv_key):
            return re.sub(pattern, template, tv_key)
    raise AssertionError(tv_key)


def mmdet_checkpoint(teacher: torch.nn.Module, laterals: int) -> dict:
    """An mmdetection-style state dict holding ``teacher``'s tensors, plus what mmdet has and a teacher
    does not need: BatchNorm counters and head weights."""
    state = {}
    for k, v in teacher.state_dict().items():
        m = re.fullmatch(r"backbone\.fpn\.extra_blocks\.(p6|p7)\.(.*)", k)
        name = f"neck.fpn_convs.{laterals + (m.group(1) == 'p7')}.conv.{m.group(2)}" if m else mmdet_name(k)
        state[name] = v.clone()
        if name.endswith("running_var"):
            state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    state["roi_head.bbox_head.0.fc_cls.weight"] = torch.zeros(81, 1024)
    state["rpn_head.rpn_conv.weight"] = torch.zeros(256, 256, 3, 3)
    return state


def test_explicit_pairs():
    keys = ["backbone.conv1.weight", "backbone.bn1.running_mean", "backbone.layer1.0.conv1.weight",
            "backbone.layer3.5.conv2.conv_offset.weight", "backbone.layer2.0.downsample.1.bias",
            "neck.lateral_convs.0.conv.weight", "neck.lateral_convs.2.conv.bias", "neck.fpn_convs.0.conv.weight",
            "neck.fpn_convs.2.conv.bias", "neck.fpn_convs.3.conv.weight", "neck.fpn_convs.4.conv.bias",
            "backbone.bn1.num_batches_tracked", "bbox_head.retina_reg.weight"]
    assert map_keys(keys) == {
        "backbone.conv1.weight": "backbone.body.conv1.weight",
        "backbone.bn1.running_mean": "backbone.body.bn1.running_mean",
        "backbone.layer1.0.conv1.weight": "backbone.body.layer1.0.conv1.weight",
        "backbone.layer3.5.conv2.conv_offset.weight": "backbone.body.layer3.5.conv2.conv_offset.weight",
        "backbone.layer2.0.downsample.1.bias": "backbone.body.layer2.0.downsample.1.bias",
        "neck.lateral_convs.0.conv.weight": "backbone.fpn.inner_blocks.0.0.weight",
        "neck.lateral_convs.2.conv.bias": "backbone.fpn.inner_blocks.2.0.bias",
        "neck.fpn_convs.0.conv.weight": "backbone.fpn.layer_blocks.0.0.weight",
        "neck.fpn_convs.2.conv.bias": "backbone.fpn.layer_blocks.2.0.bias",
        "neck.fpn_convs.3.conv.weight": "backbone.fpn.extra_blocks.p6.weight",
        "neck.fpn_convs.4.conv.bias": "backbone.fpn.extra_blocks.p7.bias",
    }


def _check_roundtrip(teacher, laterals, expect_name, expect_kwargs):
    conv = convert(mmdet_checkpoint(teacher, laterals))
    assert conv.model == expect_name and conv.kwargs == expect_kwargs
    # the converted keys are exactly the real torchvision module's, tensor for tensor
    want = teacher.state_dict()
    assert sorted(conv.state_dict) == sorted(want)
    assert all(torch.equal(conv.state_dict[k], want[k]) for k in want)
    assert conv.dropped.get("num_batches_tracked", 0) > 0 and {"roi_head", "rpn_head"} <= set(conv.dropped)
    # the model the conversion names, built with its options, loads the result strictly
    fresh = build_detector(conv.model, num_classes=2, features_only=True, **conv.kwargs)
    fresh.load_state_dict(conv.state_dict, strict=True)
    teacher.eval(), fresh.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = teacher(x), fresh(x)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    return conv


def test_retinanet_resnext_on_input_extra_convs():
    """mmdet RetinaNet: C3-C5 laterals, P6 from C5 ('on_input'), no ReLU before P7."""
    torch.manual_seed(0)
    teacher = build_detector("retinanet_resnext50_32x4d_fpn", num_classes=2, p6_from="c5", p7_relu=False,
                             features_only=True)
    conv = _check_roundtrip(teacher, 3, "retinanet_resnext50_32x4d_fpn", {"p6_from": "c5", "p7_relu": False})
    assert "backbone + FPN ->" in conv.describe()


def test_fasterrcnn_dcn_stages():
    """Cascade X101-DCN-like: modulated DCN in stages 2-4 (c3-c5), C2-C5 FPN with max-pool P6."""
    torch.manual_seed(0)
    teacher = build_detector("fasterrcnn_resnet50_fpn", num_classes=2, dcn_stages=[2, 3, 4], features_only=True)
    for blk in teacher.backbone.body.layer3:  # non-zero offsets and masks, so that the DCN path is exercised
        torch.nn.init.normal_(blk.conv2.conv_offset.weight, std=0.01)
    _check_roundtrip(teacher, 4, "fasterrcnn_resnet50_fpn", {"dcn_stages": [2, 3, 4], "dcn_modulated": True})


def test_deform_conv_matches_conv_at_zero_offset_and_shifts():
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    x = torch.randn(2, 8, 9, 11)
    v1, v2 = DeformConv(plain, modulated=False), DeformConv(plain, modulated=True)
    assert v1.conv_offset.out_channels == 18 and v2.conv_offset.out_channels == 27
    torch.testing.assert_close(v1(x), plain(x))
    torch.testing.assert_close(v2(x), 0.5 * plain(x))  # mask = sigmoid(0) everywhere
    # an offset of +1 in x for every sampling point reads the input one pixel to the right (offsets are
    # (dy, dx) pairs per kernel point); column 0 differs only through the zero padding of the plain conv
    with torch.no_grad():
        v1.conv_offset.bias.copy_(torch.tensor([0.0, 1.0] * 9))
    shifted = torch.nn.functional.pad(x[..., 1:], (0, 1))
    torch.testing.assert_close(v1(x)[..., 1:], plain(shifted)[..., 1:])


def test_bad_checkpoints_name_the_culprit(tmp_path):
    with pytest.raises(ConfigError, match="backbone.stem.0.weight"):
        map_keys(["backbone.stem.0.weight", "backbone.conv1.weight"])
    with pytest.raises(ConfigError, match="not an mmdetection"):
        convert({"head.weight": torch.zeros(1)})
    missing = tmp_path / "nope.pth"
    assert cli_main(["convert", "mmdet", str(missing), str(tmp_path / "out.pt")]) == 2
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert cli_main(["convert", "mmdet", str(bad), str(tmp_path / "out.pt")]) == 2
    assert not (tmp_path / "out.pt").exists()


def test_cli_writes_converted_file(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = build_detector("fasterrcnn_resnet18_fpn", num_classes=2, fpn_channels=32, features_only=True)
    src, dst = tmp_path / "mmdet.pth", tmp_path / "teacher.pt"
    torch.save({"meta": {"epoch": 12}, "state_dict": mmdet_checkpoint(teacher, 4)}, src)
    assert cli_main(["convert", "mmdet", str(src), str(dst)]) == 0
    assert "fasterrcnn_resnet18_fpn" in capsys.readouterr().out
    loaded = torch.load(dst, weights_only=True)
    teacher.load_state_dict(loaded, strict=True)
    assert convert_file(str(src), str(dst)).kwargs == {"fpn_channels": 32}


def test_retina_head_for_init_student():
    """mmdetection's RetinaHead (no background logit) -> torchvision's head: same box deltas, and the
    logit of mmdetection's class c is torchvision's label c + 1, anchor by anchor."""
    torch.manual_seed(0)
    tv = build_detector("retinanet_resnet18_fpn", num_classes=4, fpn_channels=32, p6_from="c5", p7_relu=False)
    teacher = build_detector("retinanet_resnet18_fpn", num_classes=4, fpn_channels=32, p6_from="c5",
                             p7_relu=False, features_only=True)
    teacher.load_state_dict({k: v for k, v in tv.state_dict().items() if k.startswith("backbone.")})
    state = mmdet_checkpoint(teacher, 3)
    sd = tv.state_dict()
    for branch, mm in (("classification_head", "cls_convs"), ("regression_head", "reg_convs")):
        for i in range(4):
            for p in ("weight", "bias"):
                state[f"bbox_head.{mm}.{i}.conv.{p}"] = sd[f"head.{branch}.conv.{i}.0.{p}"]
    for p in ("weight", "bias"):
        state[f"bbox_head.retina_reg.{p}"] = sd[f"head.regression_head.bbox_reg.{p}"]
        logits = sd[f"head.classification_head.cls_logits.{p}"]  # [9 anchors * 4 labels, ...]
        state[f"bbox_head.retina_cls.{p}"] = logits.reshape(9, 4, *logits.shape[1:])[:, 1:].reshape(
            27, *logits.shape[1:])  # mmdetection: 3 classes per anchor, no background
    conv = convert(state)
    assert conv.num_classes == 4 and "bbox_head" not in conv.dropped and "RetinaNet head" in conv.describe()
    fresh = build_detector(conv.model, num_classes=conv.num_classes, **conv.kwargs)
    fresh.load_state_dict(conv.state_dict, strict=True)
    tv.eval(), fresh.eval()
    feats = list(tv.backbone(torch.randn(1, 3, 64, 96)).values())
    with torch.no_grad():
        a, b = tv.head(feats), fresh.head(feats)
    torch.testing.assert_close(a["bbox_regression"], b["bbox_regression"], rtol=0, atol=0)
    ca, cb = a["cls_logits"].reshape(-1, 4), b["cls_logits"].reshape(-1, 4)   # [anchors, labels]
    torch.testing.assert_close(ca[:, 1:], cb[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(torch.sigmoid(cb[:, 0]), torch.full_like(cb[:, 0], 0.01))
