"""Segmentation models (dilated ResNet-V1c + PSP / ASPP heads) and the mmseg checkpoint converter."""
import os
import subprocess
import sys

import pytest
import torch

from fastkd import models
from fastkd.tasks.segmentation import convert_mmseg as mmseg
from fastkd.tasks.segmentation.models import MODELS, SegmentationModel, DilatedBasicBlock


def small(name, **kw):
    torch.manual_seed(0)
    return models.build(name, num_classes=5, zoo=MODELS, **kw)


@pytest.mark.parametrize("name", ["pspnet_r18", "deeplabv3_r18"])
def test_shapes_output_stride_8_and_features(name):
    model = small(name).eval()
    x = torch.randn(2, 3, 67, 90)
    with torch.no_grad():
        logits, feats = model(x, features=True)
        full = model(x)
    assert logits.shape == (2, 5, 9, 12)  # ceil(67/8), ceil(90/8)
    assert full.shape == (2, 5, 67, 90)
    assert {k: v.shape[1] for k, v in feats.items()} == {"layer1": 64, "layer2": 128, "layer3": 256,
                                                         "layer4": 512, "auxiliary_head": 5}
    assert feats["layer4"].shape[2:] == feats["layer2"].shape[2:] == logits.shape[2:]
    assert model.feature_reductions == {"layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}
    up = torch.nn.functional.interpolate(logits, size=(67, 90), mode="bilinear", align_corners=False)
    torch.testing.assert_close(full, up)


def test_dilations_follow_mmseg_contract_dilation():
    r18 = small("pspnet_r18")
    assert r18.stem[0].stride == (2, 2) and r18.stem[3].stride == (1, 1)
    assert [b.conv1.dilation[0] for b in r18.layer3] == [1, 2]
    assert [b.conv1.dilation[0] for b in r18.layer4] == [2, 4]
    assert all(b.conv2.dilation == (1, 1) for b in r18.layer4)  # mmseg's BasicBlock dilates conv1 only
    assert [b.conv1.stride[0] for b in (r18.layer1[0], r18.layer2[0], r18.layer3[0], r18.layer4[0])] == [1, 2, 1, 1]
    r101 = SegmentationModel(models.Bottleneck, [1, 1, 3, 2], "psp", 5, channels=16, aux_channels=8)
    assert [b.conv2.dilation[0] for b in r101.layer3] == [1, 2, 2]
    assert [b.conv2.dilation[0] for b in r101.layer4] == [2, 4]
    assert r101.feature_channels["layer4"] == 2048


def test_r101_teacher_pairs_with_r18_student_on_layer4():
    with torch.device("meta"):
        t = models.build("pspnet_r101", num_classes=19, zoo=MODELS)
        s = models.build("pspnet_r18", num_classes=19, zoo=MODELS)
    assert t.feature_channels["layer4"] == 2048 and s.feature_channels["layer4"] == 512
    assert t.feature_reductions == s.feature_reductions
    n_t = sum(p.numel() for p in t.parameters())
    assert 60e6 < n_t < 75e6  # mmseg reports 68M for pspnet_r101-d8 (incl. the auxiliary head)


def test_no_aux_head_and_bad_head():
    m = small("pspnet_r18", aux_channels=0)
    _, feats = m(torch.randn(2, 3, 32, 32), features=True)
    assert "auxiliary_head" not in feats
    with pytest.raises(ValueError, match="unknown decode head"):
        SegmentationModel(DilatedBasicBlock, [2, 2, 2, 2], "fpn", 5, channels=8)


# --- mmseg converter: keys as mmseg names them, written out here ----------------------------------------
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_module(prefix):
    return [f"{prefix}.conv.weight"] + [f"{prefix}.bn.{b}" for b in BN]


def mmseg_r18_backbone_keys():
    keys = ["backbone.stem.0.weight"] + [f"backbone.stem.1.{b}" for b in BN] + \
        ["backbone.stem.3.weight"] + [f"backbone.stem.4.{b}" for b in BN] + \
        ["backbone.stem.6.weight"] + [f"backbone.stem.7.{b}" for b in BN]
    for layer in range(1, 5):
        for block in range(2):
            p = f"backbone.layer{layer}.{block}"
            keys += [f"{p}.conv1.weight"] + [f"{p}.bn1.{b}" for b in BN]
            keys += [f"{p}.conv2.weight"] + [f"{p}.bn2.{b}" for b in BN]
            if block == 0 and layer > 1:
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{b}" for b in BN]
    return keys


PSP_HEAD_KEYS = (_conv_module("decode_head.psp_modules.0.1") + _conv_module("decode_head.psp_modules.1.1")
                 + _conv_module("decode_head.psp_modules.2.1") + _conv_module("decode_head.psp_modules.3.1")
                 + _conv_module("decode_head.bottleneck") + ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"])
ASPP_HEAD_KEYS = (_conv_module("decode_head.image_pool.1") + _conv_module("decode_head.aspp_modules.0")
                  + _conv_module("decode_head.aspp_modules.1") + _conv_module("decode_head.aspp_modules.2")
                  + _conv_module("decode_head.aspp_modules.3") + _conv_module("decode_head.bottleneck")
                  + ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"])
AUX_KEYS = _conv_module("auxiliary_head.convs.0") + ["auxiliary_head.conv_seg.weight", "auxiliary_head.conv_seg.bias"]


@pytest.mark.parametrize("name,head_keys", [("pspnet_r18", PSP_HEAD_KEYS), ("deeplabv3_r18", ASPP_HEAD_KEYS)])
def test_converter_maps_every_mmseg_key_onto_the_native_model(name, head_keys):
    mm_keys = mmseg_r18_backbone_keys() + head_keys + AUX_KEYS
    native = small(name).state_dict()
    converted = {k: mmseg.convert_key(k) for k in mm_keys}
    assert None not in converted.values()
    assert sorted(converted.values()) == sorted(native)  # one to one, nothing left over


def test_converter_moves_values_and_loads_strictly(tmp_path):
    native = small("pspnet_r18")
    inverse = {mmseg.convert_key(k): k for k in mmseg_r18_backbone_keys() + PSP_HEAD_KEYS + AUX_KEYS}
    g = torch.Generator().manual_seed(1)
    state = {mm: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for nat, v in native.state_dict().items() for mm in [inverse[nat]]}
    ckpt = tmp_path / "pspnet_r18-d8_cityscapes.pth"
    torch.save({"meta": {"CLASSES": ["a"] * 5}, "state_dict": state}, ckpt)
    out = tmp_path / "native.pt"
    mmseg.convert_checkpoint(str(ckpt), str(out), model="pspnet_r18", num_classes=5)
    loaded = torch.load(out, weights_only=True)
    native.load_state_dict(loaded, strict=True)
    sd = native.state_dict()
    torch.testing.assert_close(sd["decode_head.ppm.2.1.1.running_mean"], state["decode_head.psp_modules.2.1.bn.running_mean"])
    torch.testing.assert_close(sd["decode_head.bottleneck.0.weight"], state["decode_head.bottleneck.conv.weight"])
    torch.testing.assert_close(sd["stem.6.weight"], state["backbone.stem.6.weight"])
    torch.testing.assert_close(sd["layer3.0.downsample.1.bias"], state["backbone.layer3.0.downsample.1.bias"])
    torch.testing.assert_close(sd["auxiliary_head.convs.0.1.weight"], state["auxiliary_head.convs.0.bn.weight"])


def test_converter_bad_input(tmp_path):
    ckpt = tmp_path / "bad.pth"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(1), "decode_head.foo": torch.zeros(1)}}, ckpt)
    with pytest.raises(mmseg.ConversionError, match="backbone.conv1.weight.*decode_head.foo|non-deep stem"):
        mmseg.convert_checkpoint(str(ckpt), str(tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-m", "fastkd.cli", "convert", "mmseg", str(ckpt), str(tmp_path / "o.pt")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "decode_head.foo" in r.stderr
    assert not (tmp_path / "o.pt").exists()
