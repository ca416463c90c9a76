"""Image classification: ``(images, labels)`` batches, cross-entropy, top-1 / top-5 (``task: classification``)."""
from .task import ClassificationTask

__all__ = ["ClassificationTask"]
