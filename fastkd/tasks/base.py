"""The task interface: what the one trainer needs to know about a task (classification, detection, ...).

A task is a small object of builders and forwards, registered by name (``task: detection`` in the
config) in the spirit of torchtitan's ``TrainSpec``: the trainer, DeepSpeed, checkpoints, exact
resume, ``alpha: auto``, the MGD/CT/KD losses, logging and the CLI stay task-agnostic; a task says

- what a batch is and how it moves to the device (``build_loaders``, ``to_device``, ``batch_size``);
- how its models are built (``build_model``; teachers are then loaded and frozen by the engine);
- the student's training forward: named task-loss terms, logits (or None) and the tapped features;
- the teacher's forward: logits (or None) and the features the pairs need, without grad;
- which logit loss stacks on the features (``logit_loss``), if any;
- how evaluation runs and what it reports (``evaluate``, with ``headline`` the metric printed first).

Loaders follow the engine's contract (``fastkd/engine/data.py``): ``len`` in micro-batches,
``set_epoch``, and ``state_dict``/``load_state_dict`` for exact resume (or the trainer skips batches).
"""
from __future__ import annotations

import abc
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import Config, ConfigError, KDConfig, ModelConfig
from ..models.registry import Zoo

Features = Dict[str, torch.Tensor]


class Task(abc.ABC):
    """One kind of training problem; see the module docstring for the contract."""

    name: str = ""
    headline: str = ""  # the metric printed first, e.g. "top1", "bbox_AP", "mIoU"
    zoo: Optional[Zoo] = None  # the task's own model names (name -> factory), beside fastkd.models' zoo

    def __init__(self, cfg: Optional[Config] = None):
        self.cfg = cfg

    # -- models ------------------------------------------------------------------------------------------
    def build_model(self, mcfg: ModelConfig, role: str) -> nn.Module:
        """The model named by ``mcfg`` (``role`` is "student" or "teacher", for messages)."""
        from ..models.loading import build_model
        return build_model(mcfg, role, self.zoo)

    def load_teacher(self, mcfg: ModelConfig, device: torch.device) -> nn.Module:
        """The frozen teacher: built, its checkpoint loaded with a strict key check, eval, no grad."""
        from ..models.loading import load_teacher
        return load_teacher(mcfg, device, build=self.build_model)

    # -- data --------------------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Cheap checks of the files the task will read, before any set-up (ConfigError naming the file):
        what fails later (evaluation, after training) must fail here. Default: nothing to check."""

    @abc.abstractmethod
    def build_loaders(self, *, micro: int, grad_accum: int, rank: int, world: int, seed: int,
                      device: torch.device, dtype: torch.dtype, channels_last: bool) -> Tuple[object, object]:
        """(train loader, validation loader) of this rank."""

    @abc.abstractmethod
    def to_device(self, batch, device: torch.device, dtype: torch.dtype, channels_last: bool):
        """The batch as the models consume it (on ``device``, images in ``dtype``)."""

    @abc.abstractmethod
    def batch_size(self, batch) -> int:
        """Samples in this batch."""

    # -- forwards ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def loss_names(self, student: nn.Module) -> List[str]:
        """Names of the task-loss terms ``student_forward`` returns, in a fixed order."""

    @abc.abstractmethod
    def student_forward(self, student: nn.Module, batch) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor], Features]:
        """Training forward: (task-loss terms, each a mean over the micro-batch; logits or None; features)."""

    @abc.abstractmethod
    def teacher_forward(self, teacher: nn.Module, batch, layers: Optional[Sequence[str]]) -> Tuple[Optional[torch.Tensor], Features]:
        """No-grad forward of a frozen model: (logits or None, the features named in ``layers``, all if None).

        Also used on the student (in eval mode) to check the feature pairs at start-up.
        """

    def logit_loss(self, kd: Optional[KDConfig], backend: str) -> Optional[nn.Module]:
        """The logit-distillation module called as ``module(student_logits, teacher_logits)``, or None."""
        if kd is not None:
            raise ConfigError(f"distill.kd: logit KD is not defined for the {self.name} task; remove distill.kd")
        return None

    # -- evaluation --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader, device: torch.device, dtype: torch.dtype) -> Dict[str, float]:
        """Metrics over the whole validation set; every rank returns the same dict (model in eval mode)."""

    def describe(self, metrics: Dict[str, float]) -> str:
        """One line of the metrics for the log."""
        head = [self.headline] if self.headline in metrics else []
        rest = [k for k in metrics if k not in head and isinstance(metrics[k], float)]
        return " ".join(f"{k} {metrics[k]:.4g}" for k in head + rest[:5])

    def report(self, metrics: Dict[str, float]) -> str:
        """What ``fastkd eval`` prints: the log line, and more detail where the task has it."""
        return self.describe(metrics)
