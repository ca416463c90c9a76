"""torchvision detectors built by name; the one forward (losses + FPN levels) against torchvision's own."""
from __future__ import annotations

import pytest
import torch

tv_detection = pytest.importorskip("torchvision.models.detection", reason="torchvision does not import here")

from fastkd.tasks.detection.models import build_detector, fpn_level_names  # noqa: E402
from fastkd.tasks.detection.forward import (  # noqa: E402
    dense_forward, fpn_features, loss_names, predict, train_forward)

VARIANTS = ["retinanet_resnet18_fpn", "retinanet_resnet18_fpn_v2", "fasterrcnn_resnet18_fpn",
            "fasterrcnn_resnet18_fpn_v2"]
# small sizes so that a step takes well under a second on two cores
SMALL = dict(fpn_channels=32, anchor_sizes=[8, 16, 32, 64, 128], min_size=64, max_size=96)
SMALL_RCNN = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_test=30, box_batch_size_per_image=16, rpn_batch_size_per_image=32,
                  detections_per_img=20)
SMALL_RETINA = dict(score_thresh=0.001, topk_candidates=50, detections_per_img=20)


def tiny(name: str, num_classes: int = 4):
    extra = SMALL_RETINA if name.startswith("retinanet") else SMALL_RCNN
    return build_detector(name, num_classes=num_classes, **SMALL, **extra)


def sample():
    """Two images whose shorter side is min_size and longer side max_size: torchvision's transform
    resizes them by exactly 1, so both paths see the same pixels and boxes."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 96, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 5.0, 90.0, 40.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 20.0, 50.0, 90.0]]), "labels": torch.tensor([2])}]
    return images, targets


@pytest.mark.parametrize("name", VARIANTS)
def test_one_forward_equals_torchvision(name):
    torch.manual_seed(0)
    model = tiny(name).train()
    images, targets = sample()
    torch.manual_seed(5)
    want = model(images, targets)
    # the same seed, and torchvision's transform run first (its resize draws a size from the RNG), so that
    # Faster R-CNN's sampling draws the same anchors and proposals
    torch.manual_seed(5)
    batch, tv_targets = model.transform(images, targets)
    got, feats = train_forward(model, batch.tensors, batch.image_sizes, tv_targets)
    assert list(got) == list(want) == loss_names(model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    with torch.no_grad():
        levels = model.backbone(batch.tensors)
    assert list(feats) == fpn_level_names(model.backbone)
    for (name_, f), ref in zip(feats.items(), levels.values()):
        torch.testing.assert_close(f, ref, rtol=0, atol=0)
    # gradients flow from the detector losses into the FPN
    sum(got.values()).backward()
    assert model.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        want_det = model(images)
        got_det = predict(model, batch.tensors, batch.image_sizes)
    assert sum(len(d["boxes"]) for d in want_det) > 0
    for a, b in zip(got_det, want_det):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["retinanet_resnet18_fpn", "fasterrcnn_resnet18_fpn"])
def test_dense_part_compiles_whole_once_per_bucket_shape(name):
    """Backbone + FPN (+ RetinaNet head) trace as one graph (fullgraph, no hook, no break); the losses
    through the compiled part equal the eager ones; one compilation per bucket shape, none after."""
    from functools import partial

    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = tiny(name).train()
    counter = CompileCounter()
    dense = torch.compile(partial(dense_forward, model), backend=counter, fullgraph=True, dynamic=False)
    images, targets = sample()
    batch, tv_targets = model.transform(images, targets)
    for shape in [(96, 96), (64, 96), (96, 96), (64, 96)]:
        x = batch.tensors[..., :shape[0], :shape[1]].contiguous()
        sizes = [(min(h, shape[0]), min(w, shape[1])) for h, w in batch.image_sizes]
        torch.manual_seed(3)
        got, feats = train_forward(model, x, sizes, tv_targets, dense=dense)
        torch.manual_seed(3)
        want, ref = train_forward(model, x, sizes, tv_targets)
        for k in want:
            torch.testing.assert_close(got[k], want[k])
        assert all(torch.equal(feats[k], ref[k]) for k in ref)
    assert counter.frame_count == 2


def test_level_names_and_strides():
    images = torch.zeros(1, 3, 64, 96)
    r = fpn_features(tiny("retinanet_resnet18_fpn"), images)
    f = fpn_features(tiny("fasterrcnn_resnet18_fpn"), images)
    assert {k: v.shape[-2:] for k, v in r.items()} == {
        "fpn.p3": (8, 12), "fpn.p4": (4, 6), "fpn.p5": (2, 3), "fpn.p6": (1, 2), "fpn.p7": (1, 1)}
    assert list(f) == ["fpn.p2", "fpn.p3", "fpn.p4", "fpn.p5", "fpn.p6"] and f["fpn.p2"].shape == (1, 32, 16, 24)


def test_teacher_features_only_equals_detector_backbone():
    torch.manual_seed(0)
    full = tiny("retinanet_resnet18_fpn").eval()
    teacher = build_detector("retinanet_resnet18_fpn", num_classes=4, features_only=True, **SMALL).eval()
    backbone_keys = {k: v for k, v in full.state_dict().items() if k.startswith("backbone.")}
    assert sorted(teacher.state_dict()) == sorted(backbone_keys)
    teacher.load_state_dict(backbone_keys, strict=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = teacher(x), fpn_features(full, x)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,ref", [
    ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn"), ("retinanet_resnet50_fpn_v2", "retinanet_resnet50_fpn_v2"),
    ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn"),
    ("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn_v2")])
def test_r50_layouts_are_torchvisions(name, ref):
    """Same keys and shapes as torchvision's factories, so its COCO checkpoints load as they are. v1 has
    frozen BatchNorm as torchvision's pretrained v1 models (whose checkpoints carry no BN counters)."""
    from torchvision.ops import FrozenBatchNorm2d

    ours_model = build_detector(name, num_classes=91)
    theirs_model = getattr(tv_detection, ref)(weights=None, weights_backbone=None, num_classes=91)
    anchors = [m.anchor_generator if hasattr(m, "anchor_generator") else m.rpn.anchor_generator
               for m in (ours_model, theirs_model)]
    assert anchors[0].sizes == anchors[1].sizes and anchors[0].aspect_ratios == anchors[1].aspect_ratios
    if name.startswith("retinanet"):  # v2: GIoU box loss
        assert ours_model.head.regression_head._loss_type == theirs_model.head.regression_head._loss_type
    ours, theirs = ours_model.state_dict(), theirs_model.state_dict()
    if not name.endswith("_v2"):
        theirs = {k: v for k, v in theirs.items() if not k.endswith("num_batches_tracked")}
        assert isinstance(ours_model.backbone.body.bn1, FrozenBatchNorm2d)
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_frozen_stages_and_bn():
    from torchvision.ops import FrozenBatchNorm2d

    model = build_detector("retinanet_resnet18_fpn", num_classes=3, trainable_backbone_layers=3)
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for n in ("layer2", "layer3", "layer4")
               for p in getattr(body, n).parameters())
    assert isinstance(body.layer4[0].bn1, FrozenBatchNorm2d)
    trainable = build_detector("retinanet_resnet18_fpn_v2", num_classes=3, trainable_backbone_layers=5,
                               frozen_bn=True)
    assert all(p.requires_grad for p in trainable.backbone.body.parameters())
    assert isinstance(trainable.backbone.body.bn1, FrozenBatchNorm2d)
    eps0 = build_detector("retinanet_resnet18_fpn", num_classes=3, frozen_bn_eps=0.0)
    assert {m.eps for m in eps0.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}


def test_resnext_backbones_and_bad_names():
    model = build_detector("retinanet_resnext50_32x4d_fpn", num_classes=3, features_only=True)
    assert model.backbone.body.layer1[0].conv2.groups == 32
    x101 = build_detector("retinanet_resnext101_64x4d_fpn", num_classes=3, features_only=True)
    assert x101.backbone.body.layer1[0].conv2.weight.shape == (256, 4, 3, 3) and len(x101.backbone.body.layer3) == 23
    with pytest.raises(ValueError, match="unknown detection backbone"):
        build_detector("retinanet_resnet19_fpn")
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("fasterrcnn_vgg16_fpn")
    with pytest.raises(ValueError, match="in_channels"):
        build_detector("retinanet_resnet18_fpn", in_channels=1)
    with pytest.raises(ValueError, match="one size per FPN level"):
        build_detector("retinanet_resnet18_fpn", anchor_sizes=[8, 16])


def scenes(n: int = 4):
    """``n`` 64x96 images, each one bright rectangle (the object, class = its colour channel) on noise."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(n):
        img = torch.rand(3, 64, 96, generator=g) * 0.2
        x0, y0 = int(torch.randint(0, 50, (1,), generator=g)), int(torch.randint(0, 24, (1,), generator=g))
        w, h, c = 20 + 5 * i, 16 + 4 * i, i % 3
        img[c, y0:y0 + h, x0:x0 + w] = 1.0
        images.append(img)
        targets.append({"boxes": torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32),
                        "labels": torch.tensor([c + 1])})
    return torch.stack(images), targets


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mgd", "ct"])
def test_fpn_distillation_reduces_both_losses(kind):
    """A few dozen steps of one MGD / CT module per FPN level (P3-P7) from a frozen teacher's backbone +
    FPN: the detector loss and the distillation loss both go down."""
    from fastkd.losses import CT, MGD

    torch.manual_seed(0)
    student = tiny("retinanet_resnet18_fpn").train()
    teacher = build_detector("retinanet_resnet18_fpn", num_classes=4, features_only=True, **SMALL).eval()
    levels = ["fpn.p3", "fpn.p4", "fpn.p5", "fpn.p6", "fpn.p7"]
    losses = torch.nn.ModuleDict({
        lv.replace(".", "_"): MGD(32, 32, mask="spatial", ratio=0.65, alpha=2e-3, seed=i) if kind == "mgd"
        else CT(32, 32, alpha=2e-3) for i, lv in enumerate(levels)})
    params = [p for p in student.parameters() if p.requires_grad] + list(losses.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    images, targets = scenes()
    with torch.no_grad():
        t_feats = fpn_features(teacher, images)
    history = []
    for _ in range(30):
        det, s_feats = train_forward(student, images, [(64, 96)] * len(images), targets)
        det = sum(det.values())
        kd = sum(losses[lv.replace(".", "_")](s_feats[lv], t_feats[lv]) for lv in levels)
        opt.zero_grad()
        (det + kd).backward()
        torch.nn.utils.clip_grad_norm_(params, 35.0)
        opt.step()
        history.append((det.item(), kd.item()))
    first, last = torch.tensor(history[:5]).mean(0), torch.tensor(history[-5:]).mean(0)
    assert last[0] < 0.95 * first[0], f"detector loss {first[0]:.4f} -> {last[0]:.4f}"
    assert last[1] < 0.8 * first[1], f"{kind} loss {first[1]:.4f} -> {last[1]:.4f}"
