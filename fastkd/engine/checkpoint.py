"""Checkpoints through DeepSpeed, made atomic by a completion marker, found again by ``resume: auto``.

Layout of ``RUN_DIR/checkpoints/``::

    step_00000120/                 one DeepSpeed tag: model (student + distill modules), optimizer, scheduler
        mp_rank_00_model_states.pt     ... with the client state (step, epoch, data position, alphas)
        fastkd_rank00000.pt            per-rank RNG states and loader position
        COMPLETE                       written last, by rank 0, after every rank finished writing and every
                                       file was fsynced: JSON {step, world_size, files: {name: bytes}}
    latest                         name of the newest complete tag (replaced atomically)

A directory counts as complete only when its marker is there *and* every file the marker lists is there
with its size. A crash while saving leaves a directory without COMPLETE: ignored by ``resume: auto`` and
removed by the next save. Pruning first renames a directory to ``.trash-<tag>`` (one atomic rename), then
deletes it, so a crash while pruning never leaves a ``step_*`` directory with pieces missing.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ..atomic import atomic_write
from ..comm import barrier
from ..config import ConfigError
from .dist import is_comm_error

SUBDIR = "checkpoints"
MARKER = "COMPLETE"
TRASH = ".trash-"
CONFIG_FILE = "config.json"  # the config the checkpoint was written with (read by engine/resume.py)
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync(path: str) -> None:
    """Flush a file's or a directory's entries to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def _atomic_torch_save(obj, path: str) -> None:
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def read_marker(path: str) -> Optional[dict]:
    """The completion marker of a tag directory: {step, world_size, files}, {} for an old plain marker,
    None when there is none."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(text)
    except ValueError:
        return {}
    return marker if isinstance(marker, dict) else {}


def missing_pieces(path: str) -> List[str]:
    """Files a complete-marked checkpoint directory should hold and does not (wrong size counts as missing)."""
    marker = read_marker(path)
    if marker is None:
        return [MARKER]
    files = marker.get("files")
    if files is None:  # an old marker without a manifest: at least the model states and one rank file
        names = os.listdir(path) if os.path.isdir(path) else []
        need = [] if any(n.endswith("model_states.pt") for n in names) else ["mp_rank_00_model_states.pt"]
        return need + ([] if any(n.startswith("fastkd_rank") for n in names) else ["fastkd_rank00000.pt"])
    bad = []
    for name, size in sorted(files.items()):
        f = os.path.join(path, name)
        if not os.path.isfile(f) or os.path.getsize(f) != size:
            bad.append(name)
    return bad


def complete_tags(root: str) -> List[str]:
    """Complete checkpoint tags under ``root`` (marker present, no piece missing), oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if _TAG.match(t) and not missing_pieces(os.path.join(root, t))]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def broken_tags(root: str) -> List[Tuple[str, List[str]]]:
    """(tag, missing files) of directories that carry a completion marker but miss pieces."""
    if not os.path.isdir(root):
        return []
    out = []
    for t in sorted(os.listdir(root)):
        if _TAG.match(t) and read_marker(os.path.join(root, t)) is not None:
            missing = missing_pieces(os.path.join(root, t))
            if missing:
                out.append((t, missing))
    return out


def latest_checkpoint(run_dir: str) -> Optional[Tuple[str, str]]:
    root = os.path.join(run_dir, SUBDIR)
    tags = complete_tags(root)
    return (root, tags[-1]) if tags else None


def resolve_resume(resume: str, run_dir: str, warn: Callable[[str], None] = lambda text: None
                   ) -> Optional[Tuple[str, str]]:
    """(checkpoint root, tag) to resume from, or None for a fresh start.

    ``auto`` skips a marked directory with missing pieces (saying so through ``warn``) in favour of the
    newest complete one; a checkpoint chosen explicitly with missing pieces is refused.
    """
    if resume == "none":
        return None
    if resume == "auto":
        for tag, missing in broken_tags(os.path.join(run_dir, SUBDIR)):
            warn(f"skipping checkpoint {os.path.join(run_dir, SUBDIR, tag)}: missing {', '.join(missing)}")
        return latest_checkpoint(run_dir)
    path = os.path.abspath(resume.rstrip("/"))
    if os.path.isdir(os.path.join(path, SUBDIR)):  # a run directory
        found = latest_checkpoint(path)
        if found is None:
            raise ConfigError(f"train.resume: no complete checkpoint in {path}")
        return found
    if read_marker(path) is None:
        raise ConfigError(f"train.resume: {resume} is not a complete checkpoint directory (no {MARKER} marker)")
    missing = missing_pieces(path)
    if missing:
        raise ConfigError(f"train.resume: checkpoint {path} is incomplete: missing {', '.join(missing)}")
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
    """Collective: every rank calls it. Returns the tag directory.

    A failed write (full disk, read-only or size-limited file system) raises ConfigError naming the file
    and the cause; the directory then has no marker, so the previous checkpoint stays the one in use.
    """
    root = os.path.join(run_dir, SUBDIR)
    tag = tag_for(step)
    path = os.path.join(root, tag)
    if rank == 0:
        _writing(root, lambda: _prepare(root, tag))
    barrier()
    _writing(path, lambda: engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False))
    rank_file = os.path.join(path, f"fastkd_rank{rank:05d}.pt")
    _writing(rank_file, lambda: _atomic_torch_save({**rank_state, "rng": rng_state()}, rank_file))
    if rank == 0 and "config" in client_state:
        _writing(path, lambda: _atomic_write(os.path.join(path, CONFIG_FILE), json.dumps(client_state["config"])))
    _maybe_fail("after_shards", step)
    barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        _writing(path, lambda: _declare_complete(path, step, world_size=client_state.get("world_size", 1)))
        _maybe_fail("after_marker", step)
        _writing(root, lambda: _atomic_write(os.path.join(root, "latest"), tag + "\n"))
        prune(root, keep_last)
    barrier()
    return path


def _prepare(root: str, tag: str) -> None:
    """Rank 0 before a save: drop leftovers (trash, stale temporary files, an earlier try at this tag)."""
    os.makedirs(root, exist_ok=True)
    _remove_leftovers(root)
    if os.path.isdir(os.path.join(root, tag)):  # a crashed save at this step, or a run rewound to it
        _discard(root, tag)


def _declare_complete(path: str, step: int, world_size: int) -> None:
    """fsync every file of the tag (all ranks wrote theirs), then write the marker listing them."""
    files = {}
    for name in sorted(os.listdir(path)):
        f = os.path.join(path, name)
        if os.path.isfile(f) and name != MARKER and ".tmp." not in name:
            _fsync(f)
            files[name] = os.path.getsize(f)
    _fsync(path)
    _atomic_write(os.path.join(path, MARKER), json.dumps({"step": step, "world_size": world_size, "files": files}))


def _remove_leftovers(root: str) -> None:
    for name in os.listdir(root):
        full = os.path.join(root, name)
        if name.startswith(TRASH):
            shutil.rmtree(full, ignore_errors=True)
        elif ".tmp." in name and os.path.isfile(full):  # e.g. latest.tmp.<random> of a killed process
            os.remove(full)


def _discard(root: str, tag: str) -> None:
    """Remove a tag directory: one atomic rename out of the ``step_*`` namespace, then the deletion."""
    trash = os.path.join(root, f"{TRASH}{tag}.{os.getpid()}")
    os.rename(os.path.join(root, tag), trash)
    _fsync(root)
    _maybe_fail("in_prune", int(_TAG.match(tag).group(1)))
    shutil.rmtree(trash, ignore_errors=True)


def prune(root: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop older ones and incomplete leftovers."""
    done = complete_tags(root)
    keep = set(done[-keep_last:])
    newest = int(_TAG.match(done[-1]).group(1)) if done else -1
    for t in sorted(os.listdir(root)):
        m = _TAG.match(t)
        if not m or t in keep:
            continue
        if t in done or int(m.group(1)) < newest:
            _discard(root, t)
    _remove_leftovers(root)


def _writing(target: str, write: Callable[[], object]):
    """Run a write; an OSError (or torch's writer error) becomes one message naming the file and the cause."""
    try:
        return write()
    except (OSError, RuntimeError) as exc:
        if is_comm_error(exc):  # another rank failed during a collective of the save: not a disk problem
            raise
        raise ConfigError(f"cannot write checkpoint {getattr(exc, 'filename', None) or target}: "
                          f"{_write_cause(exc, target)}") from None


def _write_cause(exc: Exception, target: str) -> str:
    """The reason a write failed: the OS error, else (torch's writer hides errno) a probe of the place."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    where = target if os.path.isdir(target) else os.path.dirname(target)
    probe = os.path.join(where, f".probe.tmp.{os.getpid()}")
    try:
        with open(probe, "wb") as f:  # as large as a small checkpoint piece: finds a full or limited disk
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe_exc:
        return os.strerror(probe_exc.errno) if probe_exc.errno else str(probe_exc)
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def load(engine, root: str, tag: str, rank: int) -> Tuple[dict, dict]:
    """Load model, optimizer and scheduler into the engine; return (client state, this rank's state).

    Refuses (ConfigError) a checkpoint whose pieces are missing, including this rank's own file, so a
    resume is either exact or not done.
    """
    path = os.path.join(root, tag)
    rank_file = os.path.join(path, f"fastkd_rank{rank:05d}.pt")
    missing = missing_pieces(path) + ([] if os.path.isfile(rank_file) else [os.path.basename(rank_file)])
    if missing:
        raise ConfigError(f"checkpoint {path} is incomplete: missing {', '.join(sorted(set(missing)))}")
    loaded, client = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {path}")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    set_rng_state(rank_state["rng"])
    return client or {}, rank_state


def _maybe_fail(point: str, step: int) -> None:
    """Fault injection for tests: FASTKD_FAIL_SAVE=<point>@<step> ends the process at that point of a save
    (exit status 17); <point>@<step>:kill sends it SIGKILL instead, as ``kill -9`` would. Points:
    after_shards (every file written, no marker), after_marker (marker, old ``latest``), in_prune (a
    directory renamed to trash, not yet deleted; the step is the pruned one)."""
    want = os.environ.get("FASTKD_FAIL_SAVE", "")
    if want.split(":")[0] != f"{point}@{step}":
        return
    if want.endswith(":kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(17)


def model_states_file(root: str, tag: str) -> str:
    """DeepSpeed's model-states file of a tag (ZeRO-3 names it per data-parallel rank)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(root, tag, name)):
            return os.path.join(root, tag, name)
    return os.path.join(root, tag, "mp_rank_00_model_states.pt")
