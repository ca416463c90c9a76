"""Export the student alone from a run: no teacher, no generator/transform weights, strict-loadable keys."""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from ..atomic import atomic_write
from ..config import ConfigError
from . import checkpoint as ckpt

PREFIX = "student."


def student_state_dict(run_dir: str, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The student's state_dict from the latest (or the given) complete checkpoint of ``run_dir``."""
    root = os.path.join(run_dir, ckpt.SUBDIR)
    if tag is None:
        found = ckpt.latest_checkpoint(run_dir)
        if found is None:
            raise ConfigError(f"no complete checkpoint in {root}")
        tag = found[1]
    path = ckpt.model_states_file(root, tag)
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {os.path.join(root, tag)} has no model states ({os.path.basename(path)})")
    # Our own run's file, written by DeepSpeed (it pickles its config too): trusted, full unpickling.
    module = torch.load(path, map_location="cpu", weights_only=False).get("module") or {}
    if any(k.startswith(PREFIX) and v.numel() == 0 for k, v in module.items()):
        module = _consolidate_zero3(root, tag)  # ZeRO-3: parameters live partitioned in the optimizer states
    if not any(k.startswith(PREFIX) for k in module):
        raise ConfigError(f"{path} holds no student weights")
    out = {k[len(PREFIX):]: v.float() if v.is_floating_point() else v
           for k, v in module.items() if k.startswith(PREFIX) and not k.endswith("_extra_state")}
    # Compiled wrappers add "_orig_mod."; strip it so the keys are the model's own (torchvision-style).
    return {k.replace("_orig_mod.", ""): v.detach().clone() for k, v in out.items()}


def _consolidate_zero3(root: str, tag: str) -> Dict[str, torch.Tensor]:
    """Full fp32 parameters (and buffers) gathered from a ZeRO-3 checkpoint's partitions."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with contextlib.redirect_stdout(io.StringIO()):  # it prints progress per shard
        return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)


def export_student(run_dir: str, out: str, tag: Optional[str] = None) -> Dict[str, torch.Tensor]:
    state = student_state_dict(run_dir, tag)
    with atomic_write(out, "wb") as f:  # the folder is made
        torch.save(state, f)
    return state
