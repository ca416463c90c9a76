"""Process-group setup and the few collectives the engine needs (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

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
    the ``deepspeed`` launcher. The timeout makes a dead rank bring the others down instead of a hang.
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
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    n = dist.get_world_size() if dist.is_initialized() else 1
    return all_reduce_sum(t) / n


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


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
