"""The segmentation task: device batches, task losses, teacher taps, logit loss, evaluation."""
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastkd.config import Config, DataConfig, KDConfig, ModelConfig
from fastkd.engine.miou import MIoU
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
    # padding inside a batch of two touches the borders of the smaller image's predictions, so compare
    # with batch 1 as well: exact
    val1 = type(val)(val.source, transform=None, batch_size=1, num_workers=0, drop_last=False)
    exact = task.evaluate(model, val1, torch.device("cpu"), torch.float32)
    assert exact["mIoU"] == pytest.approx(want["mIoU"], rel=1e-12)
    assert exact["IoU.background"] == pytest.approx(want["IoU.0"], rel=1e-12)
    assert got["pixels"] == want["pixels"]  # padding is never scored
    assert task.describe(exact).startswith("mIoU ")


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
