"""Semantic segmentation: dense logits, cross-entropy with ignored pixels, mIoU (``task: segmentation``; the
task: ``task.py``, PSPNet / DeepLabV3: ``models.py``, mIoU: ``miou.py``, mmseg checkpoints: ``convert_mmseg.py``,
the masks picture: ``picture.py``)."""
from .task import SegmentationTask

__all__ = ["SegmentationTask"]
