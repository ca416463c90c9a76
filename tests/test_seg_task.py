"""The segmentation task: device batches, task losses, teacher taps, logit loss, evaluation."""
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastkd.config import Config, DataConfig, KDConfig, ModelConfig
from fastkd.tasks.segmentation.miou import MIoU
from fastkd.losses import ChannelWiseKD
from fastkd.tasks import build_task
from fastkd.tasks.segmentation import SegmentationTask

from test_seg_data import write_scenes

TINY = {"base_channels": 16, "channels": 16, "aux_channels": 8}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_scenes(str(root), "train", 4)
    write_scenes(str(root), "val", 3)
    cfg = Config(task="segmentation", student=ModelConfig(name="pspnet_r18", num_classes=11, kwargs=TINY),
                 data=DataConfig(source="fashion-scenes", path=str(root), image_size=32, num_workers=0,
                                 kwargs={"img_scale": [56, 40], "val_batch_size": 2}))
    task = build_task(cfg)
    assert isinstance(task, SegmentationTask)
    torch.manual_seed(0)
    model = task.build_model(cfg.student, "student")
    train, val = task.build_loaders(micro=2, grad_accum=1, rank=0, world=1, seed=0, device="cpu",
                                    dtype=torch.float32, channels_last=False)
    return task, model, train, val


def test_to_device_normalises_and_losses_are_mmsegs(setup):
    task, model, train, _ = setup
    raw = next(iter(train))
    batch = task.to_device(raw, "cpu", torch.float32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(batch.images, (raw.images.float() / 255 - mean) / std)
    assert batch.labels.dtype == torch.int64 and task.batch_size(batch) == 2
    assert task.loss_names(model) == ["ce", "aux_ce"]
    model.train()
    torch.manual_seed(1)
    losses, logits, feats = task.student_forward(model, batch)
    torch.manual_seed(1)
    ref_logits, ref_feats = model(batch.images, features=True)
    labels = batch.labels

    def ce(z):
        up = F.interpolate(z, size=labels.shape[1:], mode="bilinear", align_corners=False)
        per_pixel = F.cross_entropy(up, labels, ignore_index=255, reduction="none")
        return per_pixel.sum() / labels.numel()  # ignored pixels count in the denominator (avg_non_ignore=False)

    torch.testing.assert_close(losses["ce"], ce(ref_logits))
    torch.testing.assert_close(losses["aux_ce"], 0.4 * ce(ref_feats["auxiliary_head"]))
    assert logits.shape == (2, 11, 4, 4) and feats["layer4"].shape == (2, 128, 4, 4)
    (losses["ce"] + losses["aux_ce"]).backward()
    assert model.layer1[0].conv1.weight.grad is not None


def test_teacher_forward_and_logit_loss(setup):
    task, model, train, _ = setup
    batch = task.to_device(next(iter(train)), "cpu")
    model.eval()
    logits, feats = task.teacher_forward(model, batch, ["layer4", "layer3"])
    assert set(feats) == {"layer4", "layer3"} and not logits.requires_grad
    kd = task.logit_loss(KDConfig(alpha=3.0, temperature=4.0), "auto")
    assert isinstance(kd, ChannelWiseKD) and kd.alpha == 3.0 and kd.temperature == 4.0
    assert task.logit_loss(None, "auto") is None
    assert set(task.teacher_forward(model, batch, None)[1]) == {"layer1", "layer2", "layer3", "layer4",
                                                                "auxiliary_head"}
    assert kd(logits, logits).item() == pytest.approx(0.0, abs=1e-6)


def test_evaluate_is_the_miou_of_full_resolution_predictions(setup):
    task, model, _, val = setup
    model.eval()
    got = task.evaluate(model, val, torch.device("cpu"), torch.float32)
    metric = MIoU(11)
    for i in range(len(val.source)):
        image, label = val.source[i]
        x = task.to_device(types.SimpleNamespace(images=torch.from_numpy(image).permute(2, 0, 1)[None],
                                                 labels=torch.from_numpy(label)[None]), "cpu").images
        with torch.no_grad():
            pred = model(x).argmax(1)[0]
        assert pred.shape == label.shape
        metric.update(pred, torch.from_numpy(label.astype(np.int64)))
    want = metric.compute()
    for key in ("mIoU", "mAcc", "aAcc", "pixels"):  # val_batch_size 2, images of two sizes: exact
        assert got[key] == pytest.approx(want[key], rel=1e-12, nan_ok=True), key
    assert got["IoU.background"] == pytest.approx(want["IoU.0"], rel=1e-12)
    assert task.describe(got).startswith("mIoU ")


def test_evaluation_does_not_depend_on_which_images_share_a_batch(tmp_path):
    """16 val scenes of four sizes: val_batch_size 1, 5 and 16 give the same confusion histogram, bit for
    bit (a batch padded to its largest image would let the network see the padding: PSP pooling, the
    receptive field)."""
    write_scenes(str(tmp_path), "val", 16, sizes=((40, 56), (48, 48), (32, 64), (48, 48), (24, 40)))
    from fastkd.data.segmentation.loader import SegLoader, make_source

    task = SegmentationTask(Config(task="segmentation", student=ModelConfig(name="pspnet_r18", num_classes=11,
                                                                           kwargs=TINY)))
    torch.manual_seed(0)
    model = task.build_model(task.cfg.student, "student").eval()
    source = make_source("fashion-scenes", str(tmp_path), "val")
    loaders = {b: SegLoader(source, transform=None, batch_size=b, num_workers=0, drop_last=False) for b in (1, 5, 16)}
    metrics = {b: task.evaluate(model, loader, "cpu") for b, loader in loaders.items()}
    for b in (5, 16):  # exactly (NaN: a class neither labelled nor predicted)
        assert metrics[b] == pytest.approx(metrics[1], rel=0, abs=0, nan_ok=True), b
    counts = {b: task.area_counts(model, loader, "cpu") for b, loader in loaders.items()}
    assert counts[1][3].sum() == sum(int((source[i][1] != 255).sum()) for i in range(16))  # every labelled pixel
    assert counts[1][2].count_nonzero() > 1  # more than one class predicted: a histogram that can change
    for b in (5, 16):
        assert torch.equal(counts[b], counts[1]), (b, (counts[b] - counts[1]).abs().sum())


def test_bad_data_config_is_one_clear_error(tmp_path):
    from fastkd.config import ConfigError

    def loaders(**data):
        cfg = Config(task="segmentation", student=ModelConfig(name="pspnet_r18", num_classes=11),
                     data=DataConfig(num_workers=0, **data))
        return SegmentationTask(cfg).build_loaders(micro=2, grad_accum=1, rank=0, world=1, seed=0, device="cpu",
                                                   dtype=torch.float32, channels_last=False)

    with pytest.raises(ConfigError, match="data.path is not set"):
        loaders(source="fashion-scenes")
    with pytest.raises(ConfigError, match="'coco' is not one of"):
        loaders(source="coco", path=str(tmp_path))
    with pytest.raises(ConfigError, match=f"{tmp_path}.*no label maps"):
        loaders(source="fashion-scenes", path=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown segmentation data option.*crop"):
        loaders(source="fashion-scenes", path=str(tmp_path), kwargs={"crop": 3})
    with pytest.raises(FileNotFoundError, match="train"):
        loaders(source="ffcv", path=str(tmp_path))


def test_eval_report_prints_iou_per_class(setup):
    task, model, _, val = setup
    metrics = task.evaluate(model.eval(), val, torch.device("cpu"), torch.float32)
    lines = task.report(metrics).splitlines()
    assert lines[0] == task.describe(metrics) and lines[1] == "IoU per class (%):"
    assert [line.split()[0] for line in lines[2:]] == list(val.classes)[:1] + [
        c.replace("/", "_").replace(" ", "_") for c in val.classes[1:]]
    assert float(lines[2].split()[1]) == pytest.approx(metrics["IoU.background"], abs=0.005)
