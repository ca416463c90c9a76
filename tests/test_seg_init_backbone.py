"""Segmentation models start from ImageNet backbones: open-mmlab v1c, mmpretrain ResNetV1c and torchvision
ResNet files (``student.kwargs.init_backbone``, ``fastkd convert backbone``).

The files are written here from each library's layout, described independently of fastkd's key map:
mmcv / mmseg's ResNetV1c stem is one Sequential of conv, BN, ReLU x3 (indices 0,1,3,4,6,7), mmpretrain's
three ConvModules (``stem.I.conv`` / ``stem.I.bn``) inside an ImageClassifier (``backbone.*``,
``head.fc.*``), torchvision's a 7x7 ``conv1`` + ``bn1``; the residual stages are named alike in all
(``layerI.J.convK`` / ``bnK`` / ``downsample.{0,1}``, a downsample where the stride or width changes).
"""
import os
import subprocess
import sys

import pytest
import torch
import yaml

from fastkd import models
from fastkd.config import ConfigError, ModelConfig, load_config
from fastkd.tasks.segmentation import SegmentationTask
from fastkd.tasks.segmentation.backbone_init import init_backbone
from fastkd.tasks.segmentation.models import MODELS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn(prefix, c):
    return {f"{prefix}.{n}": [] if n == "num_batches_tracked" else [c] for n in BN}


def stages(depth, base=64):
    """{key: shape} of layer1..layer4 as mmpretrain's ResLayer / torchvision's _make_layer build them."""
    kind, blocks = ARCH[depth]
    expansion = 1 if kind == "basic" else 4
    out, cin = {}, base
    for i, n in enumerate(blocks):
        planes, stride = base * 2 ** i, 1 if i == 0 else 2
        cout = planes * expansion
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            if kind == "basic":
                out.update({f"{p}.conv1.weight": [planes, cin, 3, 3], **bn(f"{p}.bn1", planes),
                            f"{p}.conv2.weight": [planes, planes, 3, 3], **bn(f"{p}.bn2", planes)})
            else:
                out.update({f"{p}.conv1.weight": [planes, cin, 1, 1], **bn(f"{p}.bn1", planes),
                            f"{p}.conv2.weight": [planes, planes, 3, 3], **bn(f"{p}.bn2", planes),
                            f"{p}.conv3.weight": [cout, planes, 1, 1], **bn(f"{p}.bn3", cout)})
            if j == 0 and (stride != 1 or cin != cout):
                out.update({f"{p}.downsample.0.weight": [cout, cin, 1, 1], **bn(f"{p}.downsample.1", cout)})
            cin = cout
    return out, cin


def layout(kind, depth=18, base=64, counters=True):
    """{key: shape} of an ImageNet checkpoint: ``v1c`` (open-mmlab://resnetXX_v1c), ``mmpretrain``
    (ImageClassifier with ResNetV1c) or ``torchvision``."""
    body, features = stages(depth, base)
    half = base // 2
    if kind == "v1c":
        stem = {"stem.0.weight": [half, 3, 3, 3], **bn("stem.1", half), "stem.3.weight": [half, half, 3, 3],
                **bn("stem.4", half), "stem.6.weight": [base, half, 3, 3], **bn("stem.7", base)}
        out = {**stem, **body, "fc.weight": [1000, features], "fc.bias": [1000]}
    elif kind == "mmpretrain":
        stem = {}
        for i, (cin, cout) in enumerate([(3, half), (half, half), (half, base)]):
            stem.update({f"stem.{i}.conv.weight": [cout, cin, 3, 3], **bn(f"stem.{i}.bn", cout)})
        out = {f"backbone.{k}": v for k, v in {**stem, **body}.items()}
        out.update({"head.fc.weight": [1000, features], "head.fc.bias": [1000]})
    else:
        out = {"conv1.weight": [base, 3, 7, 7], **bn("bn1", base), **body, "fc.weight": [1000, features],
               "fc.bias": [1000]}
    return {k: v for k, v in out.items() if counters or not k.endswith("num_batches_tracked")}


def tensors(shapes, seed=0):
    """Plausible random weights (positive variances) of the given shapes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith(".weight") and len(shape) == 4:
            out[key] = torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        elif key.endswith(".weight") and len(shape) == 1:  # a BatchNorm's scale
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=g)
    return out


# fastkd's stem index of each layout's stem module (from the layouts above, not from fastkd's converter)
STEM = {"v1c": {f"stem.{i}.": f"stem.{i}." for i in (0, 1, 3, 4, 6, 7)},
        "mmpretrain": {"backbone.stem.0.conv.": "stem.0.", "backbone.stem.0.bn.": "stem.1.",
                       "backbone.stem.1.conv.": "stem.3.", "backbone.stem.1.bn.": "stem.4.",
                       "backbone.stem.2.conv.": "stem.6.", "backbone.stem.2.bn.": "stem.7."},
        "torchvision": {"conv1.": "stem.0.", "bn1.": "stem.1."}}


def expected(kind, state):
    """The model key each source tensor must land in (classifier left out)."""
    out = {}
    for key, value in state.items():
        if key.startswith(("fc.", "head.")):
            continue
        name = key[len("backbone."):] if key.startswith("backbone.") else key
        for src, dst in STEM[kind].items():
            if key.startswith(src):
                name = dst + key[len(src):]
        out[name] = value
    return out


def build(name="pspnet_r18", **kw):
    torch.manual_seed(0)
    return models.build(name, num_classes=19, zoo=MODELS, **kw)


def test_the_torchvision_layout_here_is_torchvision_s():
    torchvision = pytest.importorskip("torchvision")
    for depth, factory in ((18, torchvision.models.resnet18), (50, torchvision.models.resnet50)):
        real = {k: list(v.shape) for k, v in factory().state_dict().items()}
        assert real == layout("torchvision", depth)


@pytest.mark.parametrize("kind,depth,name", [("v1c", 18, "pspnet_r18"), ("mmpretrain", 18, "deeplabv3_r18"),
                                             ("torchvision", 18, "pspnet_r18"), ("v1c", 50, "pspnet_r50"),
                                             ("mmpretrain", 50, "pspnet_r50")])
def test_each_layout_loads_into_the_backbone(kind, depth, name, tmp_path):
    state = tensors(layout(kind, depth))
    model = build(name, **({"deep_stem": False} if kind == "torchvision" else {}))
    heads = {k: v.clone() for k, v in model.state_dict().items() if "_head." in k}
    if kind == "mmpretrain":  # as mmpretrain saves it: {"meta", "state_dict"}
        torch.save({"meta": {"epoch": 100}, "state_dict": state}, tmp_path / "in1k.pth")
        task = SegmentationTask()
        cfg = ModelConfig(name=name, num_classes=19, kwargs={"init_backbone": str(tmp_path / "in1k.pth")})
        torch.manual_seed(0)  # the same initialisation of the heads as build()
        model = task.build_model(cfg, "student")
        loaded = None
    else:
        loaded = init_backbone(model, state, "in1k.pth")
    own = model.state_dict()
    want = expected(kind, state)
    backbone = [k for k in own if k.startswith(("stem.", "layer"))]
    assert sorted(want) == sorted(backbone)
    for key, value in want.items():
        assert torch.equal(own[key], value), key
    for key, value in heads.items():  # the heads keep their initialisation
        assert torch.equal(own[key], value), key
    if loaded is not None:
        assert loaded.count == len(want) and loaded.ignored == ["fc.weight", "fc.bias"]
        name = {"v1c": "open-mmlab v1c", "torchvision": "torchvision ResNet"}[kind]
        assert loaded.describe("in1k.pth") == (f"init_backbone: loaded {len(want)} tensors from in1k.pth "
                                               f"(layout: {name}), ignored: fc.weight, fc.bias")


def test_files_without_batchnorm_counters_load():
    state = tensors(layout("v1c", counters=False))
    model = build()
    assert init_backbone(model, state, "old.pth").count == len(state) - 2


def error(model, state):
    with pytest.raises(ConfigError) as info:
        init_backbone(model, state, "in1k.pth")
    message = str(info.value)
    assert "\n" not in message and message.startswith("student.kwargs.init_backbone: in1k.pth")
    return message


def test_strict_missing_extra_and_mis_shaped_keys_are_named():
    state = tensors(layout("v1c"))
    model = build()
    del state["layer2.1.bn2.running_var"]
    assert "missing (1): layer2.1.bn2.running_var" in error(model, state)
    state = tensors(layout("v1c"))
    state["layer4.2.conv1.weight"] = torch.zeros(1)
    assert "unexpected (1): layer4.2.conv1.weight" in error(model, state)
    state = tensors(layout("mmpretrain"))
    state["neck.gap.weight"] = torch.zeros(1)  # not a classifier key: no place for it
    assert "unexpected (1): neck.gap.weight" in error(model, state)
    r50 = tensors(layout("v1c", depth=50))  # a ResNet-50 into an R18 student
    message = error(model, r50)
    assert "shape mismatches" in message and "unexpected" in message and "layer1.0.conv3.weight" in message
    whole = {f"backbone.{k}": v for k, v in tensors(layout("v1c")).items() if not k.startswith("fc.")}
    whole["decode_head.conv_seg.weight"] = torch.zeros(19, 128, 1, 1)  # an mmseg model, not an ImageNet backbone
    assert "whole segmentation model: convert it with `fastkd convert mmseg`" in error(model, whole)
    state = tensors(layout("v1c", base=32))
    assert "stem.0.weight [16, 3, 3, 3] vs [32, 3, 3, 3]" in error(model, state)


def test_a_plain_stem_file_into_a_deep_stem_model_names_the_stem():
    message = error(build(), tensors(layout("torchvision")))
    assert "torchvision ResNet" in message and "plain 7x7 stem (conv1, bn1)" in message
    assert "deep stem (three 3x3 convs, ResNet-V1c)" in message and "student.kwargs.deep_stem: false" in message
    message = error(build(deep_stem=False), tensors(layout("v1c")))
    assert "open-mmlab v1c checkpoint with a deep stem" in message


def test_not_a_resnet_file():
    message = error(build(), {"blocks.0.weight": torch.zeros(3)})
    assert "no ResNet stem" in message and "blocks" in message


def test_teacher_and_missing_file_are_config_errors(tmp_path):
    task = SegmentationTask()
    with pytest.raises(ConfigError, match=r"^teacher.kwargs.init_backbone: a teacher loads"):
        task.build_model(ModelConfig(name="pspnet_r101", kwargs={"init_backbone": "x.pth"}), "teacher")
    with pytest.raises(ConfigError, match=r"^student.kwargs.init_backbone: .*nothere.pth not found"):
        task.build_model(ModelConfig(name="pspnet_r18", kwargs={"init_backbone": str(tmp_path / "nothere.pth")}),
                         "student")


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "fastkd.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_convert_backbone_cli(tmp_path):
    state = tensors(layout("mmpretrain"))
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "mmpretrain.pth")
    res = cli("convert", "backbone", "mmpretrain.pth", "r18.pt", "--model", "pspnet_r18", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"wrote r18.pt: {len(expected('mmpretrain', state))} backbone tensors" in res.stdout
    assert "(layout: mmpretrain ResNetV1c); fits pspnet_r18" in res.stdout
    assert "ignored: head.fc.weight, head.fc.bias" in res.stdout
    out = torch.load(tmp_path / "r18.pt", weights_only=True)
    assert out.keys() == expected("mmpretrain", state).keys()
    model = build()
    loaded = init_backbone(model, out, "r18.pt")  # the written file is in the v1c layout
    assert loaded.layout == "v1c" and loaded.ignored == []
    assert torch.equal(model.stem[6].weight, state["backbone.stem.2.conv.weight"])
    # refusals: one line, no traceback
    again = cli("convert", "backbone", "mmpretrain.pth", "r18.pt", cwd=tmp_path)
    assert again.returncode != 0 and "exists" in again.stderr and "Traceback" not in again.stderr
    wrong = cli("convert", "backbone", "mmpretrain.pth", "x.pt", "--layout", "torchvision", cwd=tmp_path)
    assert "is in the mmpretrain ResNetV1c layout (mmpretrain), not torchvision" in wrong.stderr
    deeper = cli("convert", "backbone", "mmpretrain.pth", "y.pt", "--model", "pspnet_r50", cwd=tmp_path)
    assert deeper.returncode != 0 and "does not fit the model's backbone" in deeper.stderr
    assert "Traceback" not in deeper.stderr and not (tmp_path / "y.pt").exists()
    torch.save(tensors(layout("torchvision")), tmp_path / "tv.pth")
    res = cli("convert", "backbone", "tv.pth", "tv.pt", "--model", "pspnet_r18", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    plain = build(deep_stem=False)
    assert init_backbone(plain, torch.load(tmp_path / "tv.pt", weights_only=True), "tv.pt").layout == "torchvision"


def test_recipes_name_the_v1c_file_and_a_missing_one_stops_the_run_in_preflight(tmp_path):
    path = os.path.join(REPO, "configs", "cityscapes", "pspnet_r101_r18_mgd.yaml")
    assert load_config(path).student.kwargs["init_backbone"] == "checkpoints/resnet18_v1c-b5776b93.pth"
    res = cli("train", path, cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "student.kwargs.init_backbone: checkpoints/resnet18_v1c-b5776b93.pth not found" in res.stderr


@pytest.mark.slow
def test_a_training_run_starts_from_the_init_backbone_file(tmp_path):
    """A real run (fashion-scenes, 2 steps) from an mmpretrain file: the log line, and the trained student's
    backbone is the file's, moved by two small steps only (a random start is nowhere near it)."""
    from tests.test_engine_deepspeed import _ok, fastkd
    from tests.test_seg_data import write_scenes

    write_scenes(str(tmp_path / "scenes"), "train", 8)
    write_scenes(str(tmp_path / "scenes"), "val", 2)
    state = tensors(layout("mmpretrain", base=8), seed=1)
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "in1k.pth")
    student = {"base_channels": 8, "channels": 8, "aux_channels": 8, "init_backbone": str(tmp_path / "in1k.pth")}
    cfg = {"task": "segmentation", "seed": 0, "run_dir": str(tmp_path / "run"),
           "student": {"name": "pspnet_r18", "num_classes": 11, "kwargs": student},
           "data": {"source": "fashion-scenes", "path": str(tmp_path / "scenes"), "image_size": 32, "num_workers": 0,
                    "kwargs": {"img_scale": [56, 40]}},
           "optim": {"name": "sgd", "lr": 1.0e-3}, "schedule": {"name": "constant"},
           "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "progress": False, "eval_every": 0,
                     "ckpt_every": 2},
           "deepspeed": {"config": os.path.join(REPO, "configs", "deepspeed", "zero0.json")}}
    with open(tmp_path / "seg.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    res = _ok(fastkd("train", str(tmp_path / "seg.yaml"), cwd=tmp_path))
    assert (f"init_backbone: loaded {len(expected('mmpretrain', state))} tensors from {tmp_path / 'in1k.pth'} "
            "(layout: mmpretrain ResNetV1c), ignored: head.fc.weight, head.fc.bias") in res.stderr
    _ok(fastkd("export", str(tmp_path / "run"), "--out", str(tmp_path / "student.pt"), cwd=tmp_path))
    trained = torch.load(tmp_path / "student.pt", weights_only=True)
    fresh = build(base_channels=8, channels=8, aux_channels=8).state_dict()
    for key, value in expected("mmpretrain", state).items():
        if key.endswith(".weight") and value.dim() == 4:  # convolutions: two steps of lr 1e-3 from the file
            assert (trained[key] - value).abs().max() < 0.05 * value.abs().max(), key
            assert (fresh[key] - value).abs().max() > 0.2 * value.abs().max(), key
