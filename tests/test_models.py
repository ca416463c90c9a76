"""Model zoo: the forward/feature contract, torchvision key names, the registry and adapt()."""
import copy
import sys

import pytest
import torch
from torch import nn

from fastkd.models import ResNet, BasicBlock, adapt, build, list_models

# Input size per model family; the big ImageNet nets run on the meta device (shapes only, no compute).
IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
            "wide_resnet50_2", "mobilenet_v1"]
COMPUTED = {"resnet18", "mobilenet_v1", "resnet8", "resnet20", "resnet8x4", "convnet_tiny",
            "convnet_small", "convnet_base"}
STAGES = {"resnet18": ["layer1", "layer2", "layer3", "layer4"],
          "mobilenet_v1": ["model.1", "model.3", "model.5", "model.11", "model.13"],
          "resnet8x4": ["layer1", "layer2", "layer3"],
          "convnet_tiny": ["stage1", "stage2", "stage3"]}


def test_list_models_has_the_zoo():
    names = list_models()
    assert names == sorted(names)
    for name in ["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v1", "resnet8x4",
                 "resnet32x4", "resnet20", "resnet56", "convnet_tiny", "convnet_base"]:
        assert name in names


def test_a_task_zoo_is_known_beside_the_native_models():
    zoo = {"dense_net": lambda num_classes, **kw: torch.nn.Conv2d(3, num_classes, 1)}
    assert "dense_net" in list_models(zoo) and "dense_net" not in list_models()
    assert build("dense_net", 4, zoo=zoo).out_channels == 4
    with pytest.raises(ValueError, match=r"unknown model 'dense_nt'; did you mean 'dense_net'\?.*dense_net"):
        build("dense_nt", zoo=zoo)
    with pytest.raises(ValueError, match="unknown model 'dense_net'"):
        build("dense_net")


@pytest.mark.parametrize("name", list_models())
def test_logits_and_feature_shapes(name):
    size, in_ch = (64, 3) if name in IMAGENET else (28, 1)
    device = "cpu" if name in COMPUTED else "meta"
    torch.manual_seed(0)
    with torch.device(device):
        model = build(name, num_classes=7, in_channels=in_ch).eval()
        x = torch.randn(2, in_ch, size, size)
    with torch.no_grad():
        logits = model(x)
        logits2, feats = model(x, features=True)
    assert logits.shape == (2, 7) and logits2.shape == (2, 7)
    if device == "cpu":
        torch.testing.assert_close(logits, logits2)
        assert torch.isfinite(logits).all()
        # the last stage is what the head saw: no later in-place op changed a returned feature
        head = model.fc(torch.flatten(model.avgpool(list(feats.values())[-1]), 1))
        torch.testing.assert_close(head, logits)
    # every stage, in input-to-output order, each a module of the model, shapes as advertised
    assert list(feats) == list(model.feature_channels) == list(model.feature_reductions)
    if name in STAGES:
        assert list(feats) == STAGES[name]
    for stage, f in feats.items():
        model.get_submodule(stage)
        r = model.feature_reductions[stage]
        expect = (2, model.feature_channels[stage], -(-size // r), -(-size // r))
        assert tuple(f.shape) == expect, (stage, tuple(f.shape), expect)


def test_imagenet_stage_channels_and_reductions():
    with torch.device("meta"):
        r18, r50, mv1 = build("resnet18"), build("resnet50"), build("mobilenet_v1")
    assert r18.feature_channels == {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    assert r50.feature_channels == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    assert r18.feature_reductions == r50.feature_reductions == {
        "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
    assert mv1.feature_channels == {"model.1": 64, "model.3": 128, "model.5": 256, "model.11": 512,
                                    "model.13": 1024}
    assert mv1.feature_reductions == {"model.1": 2, "model.3": 4, "model.5": 8, "model.11": 16,
                                      "model.13": 32}
    with torch.device("meta"):
        _, feats = mv1(torch.empty(1, 3, 224, 224), features=True)
    assert feats["model.13"].shape == (1, 1024, 7, 7)  # MGD's distilled feature at 224 px


def test_dilated_resnet_reductions():
    with torch.device("meta"):
        model = build("resnet50", replace_stride_with_dilation=[False, True, True])
        _, feats = model(torch.empty(1, 3, 64, 64), features=True)
    assert model.feature_reductions == {"layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}
    assert feats["layer4"].shape == (1, 2048, 8, 8)
    with pytest.raises(ValueError, match="dilation"):
        build("resnet18", replace_stride_with_dilation=[False, False, True])


# torchvision.models.resnet18().state_dict() keys, in order (written out, not derived from fastkd).
RESNET18_KEYS = [
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
    "bn1.num_batches_tracked",
    "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.bn1.running_mean",
    "layer1.0.bn1.running_var", "layer1.0.bn1.num_batches_tracked", "layer1.0.conv2.weight",
    "layer1.0.bn2.weight", "layer1.0.bn2.bias", "layer1.0.bn2.running_mean", "layer1.0.bn2.running_var",
    "layer1.0.bn2.num_batches_tracked",
    "layer1.1.conv1.weight", "layer1.1.bn1.weight", "layer1.1.bn1.bias", "layer1.1.bn1.running_mean",
    "layer1.1.bn1.running_var", "layer1.1.bn1.num_batches_tracked", "layer1.1.conv2.weight",
    "layer1.1.bn2.weight", "layer1.1.bn2.bias", "layer1.1.bn2.running_mean", "layer1.1.bn2.running_var",
    "layer1.1.bn2.num_batches_tracked",
    "layer2.0.conv1.weight", "layer2.0.bn1.weight", "layer2.0.bn1.bias", "layer2.0.bn1.running_mean",
    "layer2.0.bn1.running_var", "layer2.0.bn1.num_batches_tracked", "layer2.0.conv2.weight",
    "layer2.0.bn2.weight", "layer2.0.bn2.bias", "layer2.0.bn2.running_mean", "layer2.0.bn2.running_var",
    "layer2.0.bn2.num_batches_tracked", "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight",
    "layer2.0.downsample.1.bias", "layer2.0.downsample.1.running_mean",
    "layer2.0.downsample.1.running_var", "layer2.0.downsample.1.num_batches_tracked",
    "layer2.1.conv1.weight", "layer2.1.bn1.weight", "layer2.1.bn1.bias", "layer2.1.bn1.running_mean",
    "layer2.1.bn1.running_var", "layer2.1.bn1.num_batches_tracked", "layer2.1.conv2.weight",
    "layer2.1.bn2.weight", "layer2.1.bn2.bias", "layer2.1.bn2.running_mean", "layer2.1.bn2.running_var",
    "layer2.1.bn2.num_batches_tracked",
    "layer3.0.conv1.weight", "layer3.0.bn1.weight", "layer3.0.bn1.bias", "layer3.0.bn1.running_mean",
    "layer3.0.bn1.running_var", "layer3.0.bn1.num_batches_tracked", "layer3.0.conv2.weight",
    "layer3.0.bn2.weight", "layer3.0.bn2.bias", "layer3.0.bn2.running_mean", "layer3.0.bn2.running_var",
    "layer3.0.bn2.num_batches_tracked", "layer3.0.downsample.0.weight", "layer3.0.downsample.1.weight",
    "layer3.0.downsample.1.bias", "layer3.0.downsample.1.running_mean",
    "layer3.0.downsample.1.running_var", "layer3.0.downsample.1.num_batches_tracked",
    "layer3.1.conv1.weight", "layer3.1.bn1.weight", "layer3.1.bn1.bias", "layer3.1.bn1.running_mean",
    "layer3.1.bn1.running_var", "layer3.1.bn1.num_batches_tracked", "layer3.1.conv2.weight",
    "layer3.1.bn2.weight", "layer3.1.bn2.bias", "layer3.1.bn2.running_mean", "layer3.1.bn2.running_var",
    "layer3.1.bn2.num_batches_tracked",
    "layer4.0.conv1.weight", "layer4.0.bn1.weight", "layer4.0.bn1.bias", "layer4.0.bn1.running_mean",
    "layer4.0.bn1.running_var", "layer4.0.bn1.num_batches_tracked", "layer4.0.conv2.weight",
    "layer4.0.bn2.weight", "layer4.0.bn2.bias", "layer4.0.bn2.running_mean", "layer4.0.bn2.running_var",
    "layer4.0.bn2.num_batches_tracked", "layer4.0.downsample.0.weight", "layer4.0.downsample.1.weight",
    "layer4.0.downsample.1.bias", "layer4.0.downsample.1.running_mean",
    "layer4.0.downsample.1.running_var", "layer4.0.downsample.1.num_batches_tracked",
    "layer4.1.conv1.weight", "layer4.1.bn1.weight", "layer4.1.bn1.bias", "layer4.1.bn1.running_mean",
    "layer4.1.bn1.running_var", "layer4.1.bn1.num_batches_tracked", "layer4.1.conv2.weight",
    "layer4.1.bn2.weight", "layer4.1.bn2.bias", "layer4.1.bn2.running_mean", "layer4.1.bn2.running_var",
    "layer4.1.bn2.num_batches_tracked",
    "fc.weight", "fc.bias",
]


def test_resnet18_torchvision_keys_and_shapes():
    with torch.device("meta"):
        sd = build("resnet18").state_dict()
    assert len(RESNET18_KEYS) == 122
    assert list(sd) == RESNET18_KEYS
    shapes = {"conv1.weight": (64, 3, 7, 7), "bn1.num_batches_tracked": (),
              "layer1.0.conv1.weight": (64, 64, 3, 3), "layer2.0.conv1.weight": (128, 64, 3, 3),
              "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer3.1.bn2.running_var": (256,),
              "layer4.1.conv2.weight": (512, 512, 3, 3), "fc.weight": (1000, 512), "fc.bias": (1000,)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


@pytest.mark.parametrize("name,n_keys,n_params,blocks", [
    ("resnet34", 218, 21_797_672, [3, 4, 6, 3]),
    ("resnet50", 320, 25_557_032, [3, 4, 6, 3]),
    ("resnet101", 626, 44_549_160, [3, 4, 23, 3]),
])
def test_resnet_torchvision_layout(name, n_keys, n_params, blocks):
    # key counts and parameter counts of torchvision's models (their documented #params)
    with torch.device("meta"):
        model = build(name)
    sd = model.state_dict()
    assert len(sd) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert {k.split(".")[0] for k in sd} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}
    for i, n in enumerate(blocks, start=1):
        assert {int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")} == set(range(n))
    if name == "resnet50":
        assert tuple(sd["layer1.0.conv3.weight"].shape) == (256, 64, 1, 1)
        assert tuple(sd["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
        assert tuple(sd["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)  # v1.5: stride on the 3x3
        assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
        assert tuple(sd["fc.weight"].shape) == (1000, 2048)
        assert not any(k.startswith("layer1.1.downsample") for k in sd)


def test_strict_load_between_instances_gives_same_outputs():
    torch.manual_seed(0)
    a = build("resnet18", num_classes=5).eval()
    b = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=5).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_init_and_zero_init_residual():
    plain = build("resnet8", num_classes=3)
    zero = build("resnet8", num_classes=3, zero_init_residual=True)
    assert torch.all(plain.layer1[0].bn2.weight == 1) and torch.all(plain.bn1.bias == 0)
    assert torch.all(zero.layer1[0].bn2.weight == 0) and torch.all(zero.layer1[0].bn1.weight == 1)
    w = plain.conv1.weight  # kaiming normal, fan_out = 16 * 9: std = sqrt(2 / 144)
    assert abs(w.std().item() - (2 / 144) ** 0.5) < 0.05


def test_mobilenet_v1_keys_follow_mgd():
    with torch.device("meta"):
        sd = build("mobilenet_v1").state_dict()
    shapes = {"model.0.0.weight": (32, 3, 3, 3), "model.1.0.weight": (32, 1, 3, 3),
              "model.1.3.weight": (64, 32, 1, 1), "model.13.3.weight": (1024, 1024, 1, 1),
              "model.13.4.running_var": (1024,), "fc.weight": (1000, 1024)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert {k.split(".")[0] for k in sd} == {"model", "fc"}


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown model 'resnet-18'.*did you mean 'resnet18'") as e:
        build("resnet-18")
    assert "mobilenet_v1" in str(e.value) and "convnet_tiny" in str(e.value)
    with pytest.raises(ValueError, match="mobilenet_v1"):
        build("mobilenetv1")
    with pytest.raises(ValueError, match="prefix 'tvm'"):
        build("tvm:resnet18")


@pytest.mark.parametrize("prefix,package", [("tv", "torchvision"), ("timm", "timm")])
def test_foreign_prefix_without_package(monkeypatch, prefix, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(ImportError, match=f"needs the package '{package}'"):
        build(f"{prefix}:resnet18", num_classes=10)


class Foreign(nn.Module):
    """A model that knows nothing of fastkd: returns logits only."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(16, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.head(self.body(x).mean((2, 3)))


def test_adapt_foreign_module():
    net = Foreign()
    net.body[1].eval()  # a mixed train/eval state must survive the probe
    teacher = adapt(net, ["body.2", "body.4"], input_size=(3, 32, 32))
    assert teacher.feature_channels == {"body.2": 8, "body.4": 16}
    assert teacher.feature_reductions == {"body.2": 2, "body.4": 4}
    assert net.training and not net.body[1].training
    assert torch.all(net.body[1].running_mean == 0)  # the probe ran without touching BN statistics

    x = torch.randn(2, 3, 24, 24)
    logits, feats = teacher(x, features=True)
    assert logits.shape == (2, 4) and list(feats) == ["body.2", "body.4"]
    assert feats["body.2"].shape == (2, 8, 12, 12) and feats["body.4"].shape == (2, 16, 6, 6)
    assert teacher(x).shape == (2, 4)
    assert teacher._captured == {}  # no activations kept alive between steps
    (logits.sum() + feats["body.2"].sum()).backward()
    assert net.body[0].weight.grad is not None
    assert list(teacher.state_dict()) == ["model." + k for k in net.state_dict()]

    twin = copy.deepcopy(teacher)  # hooks of the copy must write into the copy
    _, feats2 = twin(x, features=True)
    assert list(feats2) == ["body.2", "body.4"] and teacher._captured == {}


def test_adapt_given_shapes_skips_the_probe_and_validates():
    net = Foreign()
    adapt(net, ["body.4"], feature_channels={"body.4": 16}, feature_reductions={"body.4": 4})
    assert net.calls == 0
    with pytest.raises(ValueError, match=r"no submodule 'body\.5'.*did you mean 'body\.4'"):
        adapt(net, ["body.5"])
    with pytest.raises(ValueError, match="'head' gives"):
        adapt(Foreign(), ["head"], input_size=(3, 16, 16))
    with pytest.raises(ValueError, match="non-empty list"):
        adapt(net, "body.4")


@pytest.mark.parametrize("name,backend", [("convnet_tiny", "aot_eager"), ("resnet8", "eager")])
def test_compiles_fullgraph_with_features(name, backend):
    # Dynamo must capture forward(features=True) in one graph (no hooks, no breaks); aot_eager also
    # traces the backward. Inductor itself is left out: it takes ~20 s per model on this CPU.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(name, num_classes=10, in_channels=1)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 1, 28, 28)
    logits, feats = compiled(x, features=True)
    assert logits.shape == (2, 10) and list(feats) == list(model.feature_channels)
    (logits.sum() + sum(f.sum() for f in feats.values())).backward()
    model.eval()
    with torch.no_grad():
        ref, ref_feats = model(x, features=True)
        out, out_feats = compiled(x, features=True)
    torch.testing.assert_close(out, ref)
    for stage in model.feature_channels:
        torch.testing.assert_close(out_feats[stage], ref_feats[stage])
