"""Tasks as plug-ins of the one trainer (see ``base.Task``): ``task: classification | detection |
segmentation`` in a config, or ``package.module:Class`` for a task of your own."""
from __future__ import annotations

import difflib

from ..config import Config, ConfigError, import_factory
from .base import Task

TASKS = {
    "classification": "fastkd.tasks.classification:ClassificationTask",
    "detection": "fastkd.tasks.detection:DetectionTask",
    "segmentation": "fastkd.tasks.segmentation:SegmentationTask",
}


def build_task(cfg: Config) -> Task:
    """The task object of a run, from ``cfg.task``."""
    spec = TASKS.get(cfg.task, cfg.task)
    if ":" not in spec:
        close = difflib.get_close_matches(cfg.task, list(TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"task: unknown task {cfg.task!r}{hint}; known: {', '.join(TASKS)} or package.module:Class")
    cls = import_factory(spec, "task")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task {cfg.task!r}: {spec} is not a fastkd.tasks.Task subclass")
    return cls(cfg)


__all__ = ["Task", "TASKS", "build_task"]
