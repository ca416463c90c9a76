"""Building the student and teacher, loading checkpoints with a strict key check, freezing the teacher."""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..config import ConfigError, ModelConfig, import_factory
from .adapter import adapt
from .registry import Zoo, build

# Containers a state dict may be wrapped in (fastkd export, DeepSpeed "module", common trainers).
_WRAPPER_KEYS = ("student", "state_dict", "model", "module")


def build_model(cfg: ModelConfig, role: str, zoo: Optional[Zoo] = None) -> nn.Module:
    """``fastkd.models.build(name, ..., zoo=zoo)`` (``zoo``: a task's own models), or a
    ``package.module:factory`` callable with the same signature."""
    kwargs = dict(num_classes=cfg.num_classes, in_channels=cfg.in_channels, **cfg.kwargs)
    if ":" in cfg.name:
        model = import_factory(cfg.name, f"{role}.name")(**kwargs)
    else:
        try:
            model = build(cfg.name, zoo=zoo, **kwargs)
        except (KeyError, ValueError, ImportError) as exc:  # unknown name (with a suggestion), missing tv/timm
            raise ConfigError(f"{role}.name: {exc.args[0] if exc.args else cfg.name}") from None
    if cfg.feature_layers:
        model = adapt(model, cfg.feature_layers)
    return model


def load_state_dict_file(path: str, role: str = "model") -> Dict[str, torch.Tensor]:
    """A state dict from a file, unwrapped from common containers and DataParallel 'module.' prefixes."""
    if not os.path.isfile(path):
        raise ConfigError(f"{role} checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and why, nothing else
        raise ConfigError(f"{role} checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from None
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{role} checkpoint {path} does not hold a state_dict (a mapping of names to tensors)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _keys_report(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(model: nn.Module, state: Dict[str, torch.Tensor], path: str, role: str) -> None:
    """load_state_dict(strict=True) with an error that lists missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (checkpoint {list(state[k].shape)} vs model {list(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{role} checkpoint {path} does not match the {role} model "
                 f"({type(model).__name__}, {len(own)} keys; checkpoint {len(state)} keys)"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_keys_report(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_keys_report(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_keys_report(shapes, 6)}")
        raise ConfigError("\n  ".join(parts))
    model.load_state_dict(state, strict=True)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the teacher never trains, never enters the optimizer."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(cfg: ModelConfig, device: torch.device, *, gpu_fast: bool = True,
                 build: Callable[[ModelConfig, str], nn.Module] = None) -> nn.Module:
    """Build the teacher (``build``: a task's model builder), load its checkpoint strictly, freeze it;
    bf16 + channels_last on GPU."""
    if not cfg.checkpoint:
        raise ConfigError("teacher.checkpoint is required (a state_dict file of the teacher)")
    state = load_state_dict_file(cfg.checkpoint, "teacher")
    teacher = (build or build_model)(cfg, "teacher")
    load_strict(teacher, state, cfg.checkpoint, "teacher")
    teacher = freeze(teacher).to(device)
    if device.type == "cuda" and gpu_fast:
        teacher = teacher.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    return teacher


def maybe_load_student(student: nn.Module, cfg: ModelConfig) -> Optional[str]:
    if cfg.checkpoint:
        load_strict(student, load_state_dict_file(cfg.checkpoint, "student"), cfg.checkpoint, "student")
    return cfg.checkpoint
