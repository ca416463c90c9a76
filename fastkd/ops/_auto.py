"""Measured ``auto``: which accepting backend is fastest for an op at a shape bucket, on this machine.

At the first ``auto`` call of an op in a bucket (op, device kind, every input's shape -- the batch
dimension rounded up to a power of two --, dtype and layout), each backend of the device's order that
accepts the inputs is timed on those very inputs (detached copies: nothing reaches the caller's graph;
forward + backward when gradients are enabled), round-robin, at least three rounds, and the one with the
smallest best time wins (cuDNN's ``benchmark`` mode is the model; the minimum, not the median, because
on a shared machine the noise only ever adds time: the minimum is the steadiest estimate of a backend's
own cost, which is what the choice is about). Every backend computes the same op (the
same MGD mask for the same seed), so the choice changes speed, never the semantics. The decision is kept
in memory and in a JSON file under the user's cache directory, one file per machine description (CPU
model, vector extensions and torch thread count, or GPU model; torch, triton, fastkd and fastkd._C
build), so a later run on the same machine does not measure again.

    FASTKD_AUTO_TRIAL=0        no trial: the static order of ``dispatch.AUTO_ORDER``
    FASTKD_AUTO_TRIAL=fresh    measure again, ignoring (and then overwriting) the disk cache: a trial taken
                               while the machine was busy is cached like any other
    FASTKD_AUTO_TRIAL_MS=N     time budget of one trial, default 2000 (rounds = budget / one round, 3-10)
    FASTKD_CACHE_DIR=PATH      where the file lives (default $XDG_CACHE_HOME/fastkd, else ~/.cache/fastkd)

Same choice on every rank. With ``torch.distributed`` initialised and more than one process, a rank
that meets a new bucket measures it (or reads its disk cache) and keeps the result *pending*; the bucket
runs the static order meanwhile. At the 1st, 2nd, 4th, 8th ... ``auto`` call of each op every rank
all-gathers its pending results and adopts, per bucket, the one of the lowest rank that has it (rank 0's
measurement when rank 0 met the bucket). The agreed table is thus identical on every rank at every call;
the schedule depends only on how many times each op was called, which data parallelism keeps equal on
every rank, and the number of collectives grows as log2(calls) (none in steady state). Rank 0 writes the
agreed decisions to its disk cache.

Never inside a torch.compile trace: there only already agreed decisions are used, else the static order.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..atomic import write_json

# Inputs whose dimension 0 is the batch: rounded up to a power of two in the bucket key, so the last,
# smaller batch of an epoch does not trigger a new trial.
BATCH_INPUTS = ("student", "teacher", "student_logits", "teacher_logits")
# CPU flags worth naming in the machine description (they decide which kernels are fast).
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
                "amx_bf16", "asimd", "sve")
MIN_ROUNDS, MAX_ROUNDS = 3, 10


@dataclass
class Decision:
    """What ``auto`` runs for one bucket, and why."""

    choice: str
    """The backend ``auto`` runs."""
    ms: Dict[str, float] = field(default_factory=dict)
    """Best milliseconds of one call per timed backend (forward + backward when grads were enabled)."""
    source: str = "measured"
    """Where the decision came from: "measured", "disk cache", "rank N" (agreed across ranks)."""

    def as_json(self) -> dict:
        return {"choice": self.choice, "ms": self.ms}


_decided: Dict[str, Decision] = {}   # agreed decisions (identical on every rank)
_pending: Dict[str, Decision] = {}   # this rank's results not yet agreed (distributed only)
_disk: Dict[str, Dict[str, Decision]] = {}  # device kind -> this machine's cached decisions
_calls: Dict[str, int] = {}          # op -> auto calls so far (distributed only)
_memo: Dict[tuple, str] = {}         # exact signature of a call -> agreed choice (single process only)


def enabled() -> bool:
    """Whether ``auto`` measures (FASTKD_AUTO_TRIAL, default on)."""
    return os.environ.get("FASTKD_AUTO_TRIAL", "1").strip().lower() not in ("0", "false", "off", "no")


def fresh() -> bool:
    """Whether decisions on disk are ignored (FASTKD_AUTO_TRIAL=fresh): every bucket is measured anew."""
    return os.environ.get("FASTKD_AUTO_TRIAL", "1").strip().lower() == "fresh"


def budget_ms() -> float:
    raw = os.environ.get("FASTKD_AUTO_TRIAL_MS", "2000")
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"FASTKD_AUTO_TRIAL_MS={raw!r}: expected a number of milliseconds") from None


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("FASTKD_CACHE_DIR") or os.path.join(root, "fastkd")


def reset() -> None:
    """Forget every decision held in memory (the disk cache stays)."""
    for table in (_decided, _pending, _disk, _calls, _memo):
        table.clear()


# ---------------------------------------------------------------------------------------------
# Keys: the bucket of an op's inputs, and the machine
# ---------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_key(op: str, dev_type: str, inputs: dict) -> Optional[str]:
    """The bucket of ``inputs`` as a string; None when a shape is symbolic (torch.compile dynamic)."""
    parts = [op, dev_type]
    for name in sorted(inputs):
        value = inputs[name]
        if isinstance(value, torch.Tensor):
            dims = list(value.shape)
            if not all(isinstance(d, int) for d in dims):
                return None
            if name in BATCH_INPUTS and dims:
                dims[0] = _pow2(dims[0])
            layout = "cl" if value.dim() == 4 and not value.is_contiguous() and value.is_contiguous(
                memory_format=torch.channels_last) else "c"
            parts.append(f"{name}={'x'.join(map(str, dims))}:{str(value.dtype)[6:]}:{layout}")
        elif value is None or isinstance(value, (str, int, float, bool)):
            parts.append(f"{name}={value}")
    return " ".join(parts)


def signature(op: str, dev_type: str, inputs: dict) -> tuple:
    """Everything about ``inputs`` that a backend's acceptance or the bucket can depend on, as a hashable
    tuple that is cheap to build (no strings): the key of the steady-state memo."""
    sig = [op, dev_type, os.environ.get("TRITON_INTERPRET"), os.environ.get("FASTKD_AUTO_TRIAL")]
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            sig.append((name, tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad))
        else:
            sig.append((name, value))
    return tuple(sig)


def memo_get(sig: tuple) -> Optional[str]:
    """The choice made for a call of exactly this signature before, if it may be reused without going
    through :func:`choose` (one process, trial enabled, not tracing); else None."""
    return _memo.get(sig) if _memo and _world() == 1 else None


def memo_put(sig: tuple, choice: str) -> None:
    """Remember ``choice`` for this signature once the bucket's decision is settled (one process only:
    with several ranks every call goes through :func:`choose`, which counts calls for the agreement)."""
    if _world() == 1 and enabled() and not torch.compiler.is_compiling():
        _memo[sig] = choice


def settled(op: str, dev_type: str, inputs: dict, choice: str) -> bool:
    """Whether ``choice`` is the agreed decision of these inputs' bucket (not a static-order stand-in)."""
    key = bucket_key(op, dev_type, inputs)
    d = _decided.get(key) if key is not None else None
    return d is not None and d.choice == choice


def _cpu_model() -> tuple:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == (platform.processor() or platform.machine()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, [f for f in VECTOR_FLAGS if f in flags]


def machine(dev_type: str) -> Dict[str, object]:
    """What the decisions depend on besides the shapes: hardware, threads, library versions, build."""
    desc: Dict[str, object] = {"device": dev_type, "torch": torch.__version__}
    if dev_type == "cuda":
        desc["gpu"] = torch.cuda.get_device_name()
        desc["capability"] = list(torch.cuda.get_device_capability())
    else:
        desc["cpu"], desc["vector"] = _cpu_model()
        desc["threads"] = torch.get_num_threads()
    try:
        desc["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        desc["triton"] = "-"
    desc["fastkd"] = importlib.import_module("fastkd").__version__
    spec = importlib.util.find_spec("fastkd._C")
    if spec is not None and spec.origin and os.path.exists(spec.origin):
        st = os.stat(spec.origin)
        desc["fastkd._C"] = f"{st.st_size}-{int(st.st_mtime)}"  # a rebuilt extension is measured anew
    return desc


def cache_file(dev_type: str) -> str:
    digest = hashlib.sha1(json.dumps(machine(dev_type), sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"dispatch-{dev_type}-{digest}.json")


# ---------------------------------------------------------------------------------------------
# Disk cache
# ---------------------------------------------------------------------------------------------
def _read(path: str) -> Dict[str, Decision]:
    try:
        with open(path) as f:
            entries = json.load(f)["entries"]
        return {k: Decision(v["choice"], {b: float(t) for b, t in v["ms"].items()}, "disk cache")
                for k, v in entries.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"ignoring the dispatch cache {path}: unreadable ({type(exc).__name__}: {exc}); "
                      "it will be rewritten", RuntimeWarning, stacklevel=2)
        return {}


def load_disk(dev_type: str) -> Dict[str, Decision]:
    """This machine's cached decisions for a device kind (read once per process)."""
    if dev_type not in _disk:
        _disk[dev_type] = _read(cache_file(dev_type)) if enabled() else {}
    return _disk[dev_type]


def _save(dev_type: str, new: Dict[str, Decision]) -> None:
    """Merge ``new`` into the machine's cache file, atomically (a crash never leaves half a file)."""
    path = cache_file(dev_type)
    entries = {k: d.as_json() for k, d in _read(path).items()}
    entries.update({k: d.as_json() for k, d in new.items()})
    try:
        write_json(path, {"machine": machine(dev_type), "entries": entries}, indent=1, sort_keys=True)
    except OSError as exc:
        warnings.warn(f"cannot write the dispatch cache {path} ({exc}); decisions stay in memory",
                      RuntimeWarning, stacklevel=2)
    load_disk(dev_type).update(new)


# ---------------------------------------------------------------------------------------------
# The trial
# ---------------------------------------------------------------------------------------------
def _sync(dev_type: str) -> None:
    if dev_type == "cuda":
        torch.cuda.synchronize()


def _time_once(run: Callable, impl, args: dict, dev_type: str) -> float:
    """Milliseconds of one call of ``run(impl, **args)`` on detached copies (+ backward if grads are on)."""
    grad = torch.is_grad_enabled()
    copies = {k: (v.detach().requires_grad_(grad and v.requires_grad) if isinstance(v, torch.Tensor) else v)
              for k, v in args.items()}
    wrt = [v for v in copies.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    _sync(dev_type)
    t0 = time.perf_counter()
    loss = run(impl, **copies)
    if wrt:
        torch.autograd.grad(loss, wrt, allow_unused=True)
    _sync(dev_type)
    return (time.perf_counter() - t0) * 1e3


def _warm_up(run: Callable, impl, args: dict, dev_type: str) -> float:
    """The first timed call; a backend that runs out of memory on these inputs is timed as infinite."""
    try:
        return _time_once(run, impl, args, dev_type)
    except torch.OutOfMemoryError:
        if dev_type == "cuda":
            torch.cuda.empty_cache()
        return float("inf")


def measure(candidates: Dict[str, object], run: Callable, args: dict, dev_type: str) -> Dict[str, float]:
    """Best ms per candidate: one warm-up call each, then round-robin rounds within the budget."""
    first = {name: _warm_up(run, impl, args, dev_type) for name, impl in candidates.items()}
    able = {name: impl for name, impl in candidates.items() if first[name] != float("inf")}
    one_round = sum(first[name] for name in able)
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget_ms() // max(one_round, 1e-3))))
    times: Dict[str, List[float]] = {name: [] for name in able}
    for _ in range(rounds):
        for name, impl in able.items():
            times[name].append(_time_once(run, impl, args, dev_type))
    return {name: min(times[name]) if name in able else float("inf") for name in candidates}


def _fastest(ms: Dict[str, float], order: List[str]) -> str:
    return min(order, key=lambda name: (ms[name], order.index(name)))  # ties keep the static order


# ---------------------------------------------------------------------------------------------
# Choosing, and agreeing across ranks
# ---------------------------------------------------------------------------------------------
def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _agree() -> None:
    """All ranks: gather the pending results, adopt per bucket the lowest rank's (a collective)."""
    dist = torch.distributed
    gathered: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: d.as_json() for k, d in _pending.items()})
    new: Dict[str, Decision] = {}
    for rank, table in enumerate(gathered):
        for key, d in (table or {}).items():
            if key not in new and key not in _decided:
                new[key] = Decision(d["choice"], d["ms"], f"rank {rank}")
    _decided.update(new)
    _pending.clear()
    if dist.get_rank() == 0:
        for dev_type in {key.split(" ")[1] for key in new}:  # a key is "op device ..."
            _save(dev_type, {k: d for k, d in new.items() if k.split(" ")[1] == dev_type})


def _new_decision(key: str, dev_type: str, candidates: Dict[str, object], run: Callable,
                  args: dict) -> Decision:
    cached = None if fresh() else load_disk(dev_type).get(key)
    if cached is not None and cached.choice in candidates:
        return cached
    ms = measure(candidates, run, args, dev_type)
    return Decision(_fastest(ms, list(candidates)), ms, "measured")


def choose(op: str, dev_type: str, inputs: dict, candidates: Dict[str, object], run: Callable,
           args: dict) -> str:
    """The backend ``auto`` runs: ``candidates`` are the accepting backends in static order."""
    static = next(iter(candidates))
    if torch.compiler.is_compiling():  # no timing, no file, no collective: what is already in memory
        key = bucket_key(op, dev_type, inputs)
        d = _decided.get(key) if key is not None else None
        if d is None and key is not None and _world() == 1 and not fresh():
            d = _disk.get(dev_type, {}).get(key)
        return d.choice if d is not None and d.choice in candidates else static
    if not enabled():
        return static
    key = bucket_key(op, dev_type, inputs)
    world = _world()
    if key not in _decided and key not in _pending:
        d = _new_decision(key, dev_type, candidates, run, args)
        if world > 1:
            _pending[key] = d
        else:
            _decided[key] = d
            if d.source == "measured":
                _save(dev_type, {key: d})
    if world > 1:
        _calls[op] = _calls.get(op, 0) + 1
        if _calls[op] & (_calls[op] - 1) == 0:  # 1st, 2nd, 4th, 8th ... call of this op
            _agree()
    d = _decided.get(key)
    return d.choice if d is not None and d.choice in candidates else static


def preload(dev_types=("cpu",)) -> None:
    """Read the disk cache now (eagerly), so that a compiled region finds its decisions in memory."""
    if enabled():
        for dev_type in dev_types:
            load_disk(dev_type)


def status(op: str, dev_type: str, inputs: dict) -> Optional[Decision]:
    """The decision ``auto`` follows for these inputs' bucket now (agreed, or disk-cached in a single
    process), or None; a result still awaiting agreement across ranks comes with source "pending"."""
    key = bucket_key(op, dev_type, inputs)
    if key is None:
        return None
    if key in _decided:
        return _decided[key]
    if key in _pending:
        d = _pending[key]
        return Decision(d.choice, d.ms, "pending")
    if enabled() and not fresh() and _world() == 1:
        return load_disk(dev_type).get(key)
    return None
