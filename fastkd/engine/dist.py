"""The process group: setting it up (gloo on CPU, NCCL on GPU), tearing it down, BatchNorm statistics across
ranks, and what a rank says when another one fails. The collectives themselves are ``fastkd.comm``'s."""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import PeerFailure


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    timeout_s: int = 1800
    groups: Optional["DataParallelGroups"] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(timeout_s: int = 1800) -> DistContext:
    """Join the process group the launcher describes (RANK/WORLD_SIZE/...), or form a group of one.

    ``fastkd train`` as a plain process gets a one-process group, so the code path is the same as under
    the ``deepspeed`` launcher. The timeout makes a dead rank bring the others down instead of a hang;
    a group that does not form within it (rank 0 unreachable, a rank missing) is a :class:`PeerFailure`.
    """
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        _forget_deepspeed_groups()
        if os.environ.get("RANK", "0") != "0":
            _wait_for_rank0(timeout_s)
        try:
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                       timeout=datetime.timedelta(seconds=timeout_s))
        except dist.DistError as exc:  # DistNetworkError (rank 0 unreachable), DistStoreError (a rank missing)
            raise PeerFailure(_startup_failure(exc, timeout_s)) from None
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    groups = DataParallelGroups(timeout_s) if dist.get_world_size() > 1 else None
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, timeout_s, groups)


def _wait_for_rank0(timeout_s: float) -> None:
    """Wait until rank 0's rendezvous store accepts connections (PeerFailure after ``timeout_s``). c10d's own
    client would wait as long, but logs every retry with a C++ stack trace."""
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise PeerFailure(
                    f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE', '?')} cannot reach rank 0 at "
                    f"{addr}:{port} within train.dist_timeout_s={timeout_s:g} s (rank 0 has not started, has "
                    f"failed, or MASTER_ADDR/MASTER_PORT is wrong): {exc.strerror or exc}") from None
            time.sleep(0.5)


def _startup_failure(exc: BaseException, timeout_s: int) -> str:
    """The one line for a process group that did not form at start-up."""
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    cause = " ".join(str(exc).split())
    if rank != "0" and isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return (f"rank {rank} of {world} cannot reach rank 0 at {where} within train.dist_timeout_s={timeout_s} s "
                f"(rank 0 has not started, has failed, or MASTER_ADDR/MASTER_PORT is wrong): {cause}")
    return (f"rank {rank} of {world}: the process group at {where} did not form within "
            f"train.dist_timeout_s={timeout_s} s (a rank did not start, or failed): {cause}")


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches its clone of the world group and the last ``mpu`` in module globals; after a
    process group was destroyed (``fastkd train`` / the demos tear theirs down) a new one must not reuse
    them ("Group ... is not registered" at the next ``deepspeed.initialize`` in the same process)."""
    from deepspeed.utils import groups

    if hasattr(groups, "_WORLD_GROUP"):
        groups._WORLD_GROUP = None
    if hasattr(groups, "mpu"):
        groups.mpu = None


class DataParallelGroups:
    """The "mpu" handed to ``deepspeed.initialize``: data parallelism over every process, no model
    parallelism, groups created with ``train.dist_timeout_s``.

    Without it DeepSpeed builds its data-parallel group with ``new_group`` and PyTorch's default timeout
    (30 minutes), whatever the world group's timeout: a stopped rank would hang the others that long.
    """

    def __init__(self, timeout_s: int):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.data = dist.new_group(list(range(self.world)), timeout=timeout)
        self.model = dist.new_group([self.rank], timeout=timeout, use_local_synchronization=True)

    def get_data_parallel_group(self):
        return self.data

    def get_data_parallel_rank(self) -> int:
        return self.rank

    def get_data_parallel_world_size(self) -> int:
        return self.world

    def get_data_parallel_group_ranks(self):
        return list(range(self.world))

    def get_model_parallel_group(self):
        return self.model

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def norm_buffers(module: torch.nn.Module) -> dict:
    """The BatchNorm running statistics of a module, by name."""
    return {f"{name}.{b}": getattr(m, b) for name, m in module.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b in ("running_mean", "running_var") if getattr(m, b) is not None}


@contextlib.contextmanager
def averaged_norm_buffers(module: torch.nn.Module):
    """Inside the block, BatchNorm running statistics are averaged over processes; restored after.

    Without SyncBatchNorm each rank keeps its own statistics. Evaluation and the checkpointed model use
    the average (one model on every rank); training continues with each rank's own, so a resumed run
    (which restores them from the per-rank checkpoint file) continues exactly.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    bufs = norm_buffers(module)
    saved = {k: v.clone() for k, v in bufs.items()}
    for buf in bufs.values():
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)  # dist
        buf.div_(dist.get_world_size())
    try:
        yield
    finally:
        for k, buf in bufs.items():
            buf.copy_(saved[k])


# -- when a rank fails ------------------------------------------------------------------------------------

_COMM_MARKS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe",
               "socket timeout", "recvbytes", "sendbytes")


def is_comm_error(exc: BaseException) -> bool:
    """An error raised by a collective because another process failed (or stopped answering)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _COMM_MARKS)


def _store():
    from torch.distributed import distributed_c10d
    return distributed_c10d._get_default_store()


def _within(seconds: float, fn):
    """``fn()``, waited for at most ``seconds`` (TimeoutError after). The store lives in rank 0's process:
    when rank 0 is stopped (SIGSTOP, a hung host) its socket stays open and c10d's client waits for the
    reply forever, whatever the store's timeout; the call is left behind in a daemon thread."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="fastkd-store", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"rank 0's rendezvous store gave no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


_STORE_GONE = (RuntimeError, ValueError, TimeoutError)  # the store lives in rank 0's process: dead or stopped


def record_own_failure(message: str, wait_s: float = 5.0) -> None:
    """A rank failing on its own (bad file, full disk, NaN) says so first, for the others to report."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    rank = dist.get_rank()

    def report():
        store = _store()
        store.compare_set("fastkd/first_failure", "", f"rank {rank}: {message}")
        store.set(f"fastkd/failed/{rank}", "own")

    try:
        _within(wait_s, report)
    except _STORE_GONE:
        pass


def explain_comm_failure(grace_s: float = 5.0) -> Optional[str]:
    """After a collective failed in this rank: one line naming the rank that failed first, or None when
    another surviving rank (the lowest-numbered) prints it. Ranks that reported nothing within ``grace_s``
    are the ones that died or stopped. Returns within ``grace_s`` + 2 s even when rank 0, which hosts the
    store, is stopped."""
    rank, world = dist.get_rank(), dist.get_world_size()
    seen: dict = {}

    def exchange() -> str:
        store = _store()
        store.set(f"fastkd/failed/{rank}", "comm")
        deadline = time.monotonic() + grace_s
        while len(seen) < world and time.monotonic() < deadline:
            seen.update({r: store.get(f"fastkd/failed/{r}").decode() for r in range(world)
                         if r not in seen and store.check([f"fastkd/failed/{r}"])})
            time.sleep(0.2)
        return store.get("fastkd/first_failure").decode() if store.check(["fastkd/first_failure"]) else ""

    try:
        first = _within(grace_s + 2.0, exchange)
    except _STORE_GONE:
        if seen.get(0) == "comm":
            return None  # rank 0 survived and printed; it has exited since
        if rank != 1 and os.environ.get("LOCAL_RANK") != "0":
            return None  # without the store the survivors cannot agree: rank 1, and local rank 0 of other nodes
        return ("rank 0 failed first: it died or stopped answering (a collective failed or waited "
                "train.dist_timeout_s, and the rendezvous store it hosts does not answer); the other ranks stop too")
    survivors = [r for r, how in seen.items() if how == "comm"]
    if rank != min(survivors, default=rank):
        return None
    if first:
        who, what = first.split(":", 1)
        return f"{who} failed first: {what.strip()}"
    silent = ", ".join(str(r) for r in range(world) if r not in seen) or "?"
    return (f"rank {silent} failed first: it died or stopped answering (a collective failed or waited "
            f"train.dist_timeout_s); the other ranks stop too")
