"""mIoU (mmseg's definition) against a direct per-class computation; distributed sums."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastkd.tasks.segmentation.miou import MIoU, area_counts, summarize

K = 5


def random_set(seed, n=6):
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for _ in range(n):
        h, w = rng.integers(3, 12, size=2)
        label = rng.integers(0, K, size=(h, w))
        label[rng.random((h, w)) < 0.2] = 255
        label[label == 4] = 255  # class 4 never labelled: it only appears in predictions
        pred = np.where(rng.random((h, w)) < 0.6, np.where(label == 255, 0, label), rng.integers(0, K, size=(h, w)))
        preds.append(pred)
        labels.append(label)
    return preds, labels


def direct(preds, labels):
    """Per class, over the whole set: |pred = c and label = c| / |pred = c or label = c| (ignored pixels out)."""
    iou, acc = [], []
    tp = lab = 0
    for c in range(K):
        i = u = l = 0
        for p, t in zip(preds, labels):
            valid = t != 255
            i += np.sum((p == c) & (t == c) & valid)
            u += np.sum(((p == c) | (t == c)) & valid)
            l += np.sum((t == c) & valid)
        iou.append(i / u if u else math.nan)
        acc.append(i / l if l else math.nan)
        tp += i
        lab += l
    return 100 * np.nanmean(iou), 100 * np.nanmean(acc), 100 * tp / lab, iou


def test_miou_matches_direct_per_class_computation():
    preds, labels = random_set(0)
    metric = MIoU(K, class_names=list("abcde"))
    for p, t in zip(preds, labels):
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
    got = metric.compute()
    miou, macc, aacc, iou = direct(preds, labels)
    assert got["mIoU"] == pytest.approx(miou, rel=1e-12)
    assert got["mAcc"] == pytest.approx(macc, rel=1e-12)
    assert got["aAcc"] == pytest.approx(aacc, rel=1e-12)
    for name, v in zip("abcde", iou):
        assert got[f"IoU.{name}"] == pytest.approx(100 * v, rel=1e-12)
    assert got["IoU.e"] == 0.0  # predicted but never labelled: IoU 0, counted in the mean


def test_sums_over_the_set_not_a_mean_of_per_image_scores():
    p1, t1 = torch.tensor([[0, 0, 0, 1]]), torch.tensor([[0, 0, 0, 0]])
    p2, t2 = torch.tensor([[1]]), torch.tensor([[1]])
    counts = area_counts(p1, t1, 2) + area_counts(p2, t2, 2)
    got = summarize(counts)
    assert got["IoU.0"] == pytest.approx(75.0) and got["IoU.1"] == pytest.approx(50.0)
    absent = summarize(area_counts(torch.tensor([0]), torch.tensor([0]), 3))
    assert math.isnan(absent["IoU.2"]) and absent["mIoU"] == pytest.approx(100.0)  # nan-mean


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    preds, labels = random_set(0)
    metric = MIoU(K)
    for p, t in list(zip(preds, labels))[rank::world]:  # disjoint shards, as the val loaders read
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
    out[rank] = metric.compute()["mIoU"]
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_one_process_miou():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2)
    miou = direct(*random_set(0))[0]
    assert out[0] == out[1] == pytest.approx(miou, rel=1e-12)
