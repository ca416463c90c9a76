"""Checkpoints through DeepSpeed, made atomic by a completion marker, found again by ``resume: auto``.

Layout of ``RUN_DIR/checkpoints/``::

    step_00000120/                 one DeepSpeed tag: model (student + distill modules), optimizer, scheduler
        mp_rank_00_model_states.pt     ... with the client state (step, epoch, data position, alphas)
        fastkd_rank00000.pt            per-rank RNG states and loader position
        COMPLETE                       written last, by rank 0, after every rank finished writing
    latest                         name of the newest complete tag (replaced atomically)

A crash while saving leaves a directory without COMPLETE: it is ignored by ``resume: auto`` and
removed by the next successful save, so the previous checkpoint always stays loadable.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..config import ConfigError
from .dist import barrier

SUBDIR = "checkpoints"
MARKER = "COMPLETE"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def complete_tags(root: str) -> List[str]:
    """Complete checkpoint tags under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if _TAG.match(t) and os.path.isfile(os.path.join(root, t, MARKER))]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def latest_checkpoint(run_dir: str) -> Optional[Tuple[str, str]]:
    root = os.path.join(run_dir, SUBDIR)
    tags = complete_tags(root)
    return (root, tags[-1]) if tags else None


def resolve_resume(resume: str, run_dir: str) -> Optional[Tuple[str, str]]:
    """(checkpoint root, tag) to resume from, or None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = os.path.abspath(resume.rstrip("/"))
    if os.path.isdir(os.path.join(path, SUBDIR)):  # a run directory
        found = latest_checkpoint(path)
        if found is None:
            raise ConfigError(f"train.resume: no complete checkpoint in {path}")
        return found
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise ConfigError(f"train.resume: {resume} is not a complete checkpoint directory (no {MARKER} marker)")
    return os.path.dirname(path), os.path.basename(path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str, step: int, client_state: dict, rank_state: dict, *, rank: int,
         keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag directory."""
    root = os.path.join(run_dir, SUBDIR)
    tag = tag_for(step)
    path = os.path.join(root, tag)
    if rank == 0 and os.path.isdir(path):  # an incomplete leftover of a crashed save at this step
        shutil.rmtree(path)
    barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    _atomic_torch_save({**rank_state, "rng": rng_state()}, os.path.join(path, f"fastkd_rank{rank:05d}.pt"))
    _maybe_fail("after_shards", step)
    barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        _atomic_write(os.path.join(path, MARKER), f"{step}\n")
        _atomic_write(os.path.join(root, "latest"), tag + "\n")
        prune(root, keep_last)
    barrier()
    return path


def prune(root: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop older ones and incomplete leftovers."""
    done = complete_tags(root)
    keep = set(done[-keep_last:])
    newest = int(_TAG.match(done[-1]).group(1)) if done else -1
    for t in os.listdir(root):
        m = _TAG.match(t)
        if not m or t in keep:
            continue
        if t in done or int(m.group(1)) < newest:
            shutil.rmtree(os.path.join(root, t), ignore_errors=True)


def load(engine, root: str, tag: str, rank: int) -> Tuple[dict, dict]:
    """Load model, optimizer and scheduler into the engine; return (client state, this rank's state)."""
    path, client = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}")
    rank_file = os.path.join(root, tag, f"fastkd_rank{rank:05d}.pt")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False) if os.path.isfile(rank_file) else {}
    if "rng" in rank_state:
        set_rng_state(rank_state["rng"])
    return client or {}, rank_state


def _maybe_fail(point: str, step: int) -> None:
    """Fault injection for tests: FASTKD_FAIL_SAVE=<point>@<step> kills the process at that point of a save."""
    if os.environ.get("FASTKD_FAIL_SAVE") == f"{point}@{step}":
        os._exit(17)


def model_states_file(root: str, tag: str) -> str:
    """DeepSpeed's model-states file of a tag (ZeRO-3 names it per data-parallel rank)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(root, tag, name)):
            return os.path.join(root, tag, name)
    return os.path.join(root, tag, "mp_rank_00_model_states.pt")
