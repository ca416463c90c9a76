"""The segmentation training step (``configs/cityscapes/pspnet_r101_r18_mgd.yaml``: PSPNet-R18 <- PSPNet-R101,
MGD on layer4 + the channel-wise logit loss) through the segmentation task's forwards and the Distiller, on
synthetic images and labels (a :class:`fastkd.data.segmentation.loader.SegBatch`). The variants and the timing are
:mod:`step_detection`'s (student, kd-ref, kd-auto, kd-fused = the Distiller's whole-forward torch.compile and
a compiled teacher); the "losses alone" row is MGD on layer4 (the logit loss runs inside the student's region).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Tuple

import torch

from benchmarks import step_detection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "cityscapes", "pspnet_r101_r18_mgd.yaml")

# name -> (student, teacher, crop side, batch)
SHAPES: Dict[str, Tuple[str, str, int, int]] = {
    "gpu": ("pspnet_r18", "pspnet_r101", 512, 8),
    "cpu": ("pspnet_r18", "pspnet_r101", 256, 2),
    "tiny": ("pspnet_r18", "pspnet_r18", 64, 2),
}
DEFAULT_VARIANTS = {"gpu": ["student", "kd-ref", "kd-auto", "kd-fused"], "cpu": ["student", "kd-ref", "kd-auto"],
                    "tiny": ["student", "kd-ref", "kd-auto"]}
LOSS_LABEL = "MGD loss layer4 fwd+bwd"


def build(shape: str, variant: str, batch, device, dtype):
    """(distiller, optimizer) as the trainer builds them (minus DeepSpeed and the teacher's checkpoint)."""
    from fastkd.config import build_config, load_yaml
    from fastkd.tasks.segmentation import SegmentationTask

    backend, compile, with_teacher = step_detection.VARIANTS[variant]
    student_name, teacher_name, _, _ = SHAPES[shape]
    tree = load_yaml(CONFIG)
    tree["student"]["name"], tree["teacher"]["name"] = student_name, teacher_name
    tree["teacher"]["checkpoint"] = "unused: random weights"  # required by the config; never loaded here
    tree["student"].get("kwargs", {}).pop("init_backbone", None)  # random weights: the step's time is the same
    tree["distill"]["backend"] = backend
    tree["train"]["compile"] = compile
    cfg = build_config(tree, source=CONFIG)
    return step_detection.build_distiller(SegmentationTask(cfg), cfg, batch, device, dtype, backend=backend,
                                          compile=compile, with_teacher=with_teacher)


def synthetic_batch(shape: str, device, dtype, *, channels_last: bool, seed: int = 0):
    """A SegBatch as ``task.to_device`` returns it: normalised images, int64 labels 0..18 with 5 % ignored."""
    from fastkd.data.segmentation.loader import SegBatch

    _, _, side, n = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(n, 3, side, side, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    labels = torch.randint(0, 19, (n, side, side), generator=g)
    labels[torch.rand(n, side, side, generator=g) < 0.05] = 255
    return SegBatch(images, labels.to(device))


def measure(shape: str, variants: List[str], device, dtype, *, warmup: int, rep: int,
            report: Callable[[List[list]], None] = lambda rows: None) -> List[list]:
    """Rows of :data:`step_detection.COLUMNS` (its last column: the MGD loss's share of the step)."""
    student, teacher, side, n = SHAPES[shape]
    batch = synthetic_batch(shape, device, dtype, channels_last=device.type == "cuda")
    return step_detection.run_variants(lambda name, b: build(shape, name, b, device, dtype), batch, variants,
                                       device, recipe=f"{student} <- {teacher} {side}x{side}", n=n,
                                       loss_label=LOSS_LABEL, warmup=warmup, rep=rep, report=report)
