"""What a resume does with settings that changed since the checkpoint: apply, ignore (and say so), or refuse.

Every checkpoint holds the config it was written with (``config.json`` in the tag directory, and in the
DeepSpeed client state). ``review`` compares it with the new one before any expensive set-up:

- refused (ConfigError naming each setting): the checkpoint's weights, optimizer state, data position or
  RNG streams would not match (model, optimizer kind and hyper-parameters, batch layout, precision,
  ZeRO preset, seed, data source and size, pair structure, number of processes);
- applied, with a message: the learning rate (``apply_lr`` rescales the restored schedule), schedule,
  length of the run, loss weights and settings read from the config each step;
- ignored, with a message: settings only used at the very start of a run;
- silently followed: logging, checkpoint cadence, compile, workers, timeouts.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from ..atomic import write_json
from ..config import DEFAULT_LOSS, Config, ConfigError, pair_keys, to_dict
from .checkpoint import CONFIG_FILE

# alphas: Distiller.apply_explicit_alphas; imports: what they register is compared through the pairs
_SILENT = re.compile(r"^(run_dir|imports|train\.(resume|progress|log_every|eval_every|eval_teacher|ckpt_every|"
                     r"keep_last|session_steps|dist_timeout_s|compile|compile_teacher)|data\.num_workers|"
                     r"distill\.backend|distill\.pairs\.\d+\.alpha|distill\.kd\.alpha)$")
_IGNORED = {
    "student.checkpoint": "the student's weights come from the checkpoint",
    "distill.calibration_batches": "alpha: auto was calibrated when the run started",
}
_IGNORED_RE = re.compile(r"^distill\.pairs\.\d+\.target$")
_REFUSED = re.compile(r"^(seed|student\.(?!checkpoint$).*|teacher\.(name|num_classes|kwargs)(\..*)?|"
                      r"optim\.(?!lr$).*|train\.(batch_size|grad_accum|precision|sync_bn)|deepspeed\..*|"
                      r"data\.(source|train_size|channels|num_classes)|distill\.pairs(\.\d+\."
                      r"(student|teacher|loss))?|distill\.kd)$")
_WHY = {
    "seed": "the data order and MGD masks continue from the checkpoint's streams",
    "optim": "the optimizer state in the checkpoint belongs to the old optimizer settings",
    "student": "the checkpoint's weights belong to the old student",
    "teacher": "the distillation modules were built for the old teacher",
    "train": "the saved data position and per-process state belong to the old batch layout",
    "deepspeed": "the optimizer state is partitioned for the old ZeRO setting",
    "data": "the saved data position belongs to the old data set",
    "distill": "the checkpoint's distillation modules belong to the old pairs",
}


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a.b.0.c": leaf}; lists and dicts are walked, a missing subtree is one None leaf."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)) and tree and isinstance(tree[0], dict):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}
    out: Dict[str, Any] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}{k}."))
    if not out and prefix:
        out[prefix[:-1]] = tree
    return out


def saved_config(root: str, tag: str) -> Optional[dict]:
    """The config a checkpoint was written with (None for checkpoints that predate the file)."""
    path = os.path.join(root, tag, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _structure_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Keys whose presence differs: one entry for the list or section, e.g. distill.pairs, distill.kd."""
    out = set()
    for key in set(old) ^ set(new):
        m = re.match(r"^(distill\.pairs|distill\.kd|teacher)", key)
        out.add(m.group(1) if m else key)
    return sorted(k for k in out if not any(k.startswith(p + ".") for p in out))  # "data.kwargs", not also .foo


def _own_pair_keys(saved: dict) -> dict:
    """Configs written before each loss had its pair class held every loss's keys in every pair (an MGD
    pair had ``hidden_channels: null``): keep those of the pair's own loss, as configs have them now."""
    pairs = (saved.get("distill") or {}).get("pairs")
    if not isinstance(pairs, list):
        return saved
    own = []
    for p in pairs:
        keys = pair_keys(p.get("loss", DEFAULT_LOSS)) if isinstance(p, dict) else None
        own.append(p if keys is None else {k: v for k, v in p.items() if k in keys})
    return {**saved, "distill": {**saved["distill"], "pairs": own}}


def review(saved: dict, cfg: Config, *, saved_world: Optional[int], world: int, where: str) -> List[str]:
    """Messages for the changed settings a resume honours or ignores; ConfigError for those it cannot."""
    old, new = flatten(_own_pair_keys(saved)), flatten(to_dict(cfg))
    refused: List[str] = []
    notes: List[str] = []
    for key in _structure_changes(old, new):
        if _REFUSED.match(key) or key.startswith(("distill.pairs", "distill.kd", "teacher")):
            refused.append(f"{key} (added or removed): {_WHY.get(key.split('.')[0], 'not resumable')}")
        elif not _SILENT.match(key):
            notes.append(f"{key} (added or removed): applied from the new config")
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        if a == b or _SILENT.match(key):
            continue
        change = f"{key} {a!r} -> {b!r}"
        if _REFUSED.match(key):
            refused.append(f"{change}: {_WHY[key.split('.')[0]]}")
        elif key in _IGNORED or _IGNORED_RE.match(key):
            notes.append(f"{change} is ignored on resume: {_IGNORED.get(key, _IGNORED['distill.calibration_batches'])}")
        elif key == "optim.lr":
            notes.append(f"{change}: applied (the restored schedule is rescaled to the new peak)")
        else:
            notes.append(f"{change}: applied from the new config")
    if saved_world is not None and saved_world != world:
        refused.append(f"number of processes {saved_world} -> {world}: the per-process data positions and RNG "
                       f"states of the checkpoint belong to {saved_world} processes")
    if refused:
        raise ConfigError(f"cannot resume from {where} with changed setting(s): " + "; ".join(refused) +
                          ". Restore them, or start afresh (another run_dir, or train.resume=none)")
    return notes


def review_checkpoint(cfg: Config, found: Optional[Tuple[str, str]], world: int) -> Optional[List[str]]:
    """``review`` against the config file of the checkpoint about to be resumed, before any set-up; None
    when there is nothing to resume or the checkpoint predates the file (then ``after_load`` reviews)."""
    if found is None:
        return None
    saved = saved_config(*found)
    if saved is None:
        return None
    from .checkpoint import read_marker
    marker = read_marker(os.path.join(*found)) or {}
    return review(saved, cfg, saved_world=marker.get("world_size"), world=world, where=os.path.join(*found))


def after_load(cfg: Config, engine, client: dict, notes: Optional[List[str]], world: int) -> List[str]:
    """After DeepSpeed restored the checkpoint: apply the new learning rate; the messages to print."""
    if notes is None:  # an older checkpoint: its config is in the client state only
        notes = review(client["config"], cfg, saved_world=client.get("world_size"), world=world,
                       where="the checkpoint") if client.get("config") else []
    apply_lr(engine, cfg.optim.lr)
    return notes


def write_attempt_config(cfg: Config, step: int) -> str:
    """The config of this attempt, once training starts: ``config.json`` for a fresh start,
    ``config.step_<N>.json`` for a resume from step N (the first attempt's file stays)."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    name = CONFIG_FILE if step == 0 else f"config.step_{step:08d}.json"
    path = os.path.join(cfg.run_dir, name)
    write_json(path, to_dict(cfg), indent=1)
    return path


def apply_lr(engine, lr: float) -> Tuple[float, float]:
    """Make the restored LambdaLR schedule peak at ``lr`` (the checkpoint brought back its own peak);
    returns (old peak, new peak)."""
    sched = engine.lr_scheduler
    old = float(sched.base_lrs[0])
    if old != lr:
        sched.base_lrs = [lr for _ in sched.base_lrs]
        for group, f in zip(sched.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * f(sched.last_epoch)
    return old, lr


def check_not_past_end(found: Optional[Tuple[str, str]], total_steps: int, cfg: Config) -> None:
    """A resume whose run length ends before the checkpoint's step cannot train anything: refused (a run
    cannot be shortened below what it has trained), instead of "applied" and an exit with nothing done."""
    if found is None:
        return
    from .checkpoint import read_marker
    tag = re.match(r"^step_(\d+)$", found[1])
    step = (read_marker(os.path.join(*found)) or {}).get("step", int(tag.group(1)) if tag else None)
    if step is not None and step > total_steps:
        length = (f"train.max_steps={cfg.train.max_steps}" if cfg.train.max_steps
                  else f"train.epochs={cfg.train.epochs} ({total_steps} steps)")
        raise ConfigError(f"{length} ends the run at step {total_steps}, but the checkpoint {os.path.join(*found)} "
                          f"is at step {step}: the run is already past its end and nothing would be trained. Raise "
                          "the run length to continue it, or start afresh (another run_dir, or train.resume=none)")
