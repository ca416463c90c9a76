"""Object detection: torchvision's RetinaNet / Faster R-CNN distilled on their FPN levels, COCO box AP
(``task: detection``; the task: ``task.py``, the detectors: ``models.py``, their forwards: ``forward.py``,
COCO evaluation: ``coco_eval.py``, mmdetection checkpoints: ``convert_mmdet.py``)."""
from .task import DetectionTask

__all__ = ["DetectionTask"]
