"""The ranks a model spans: torch.distributed's process group (joined from the environment when
nobody has yet: torchrun, SLURM, Kubernetes set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), a group
of bigload's own for its transfers, a gloo group for small control messages, and the store that
carries a failing rank's error to the others."""

from __future__ import annotations

import datetime
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..errors import DistributedError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0  # a call waits at most this long for another rank
ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun, SLURM, k8s set


def local_ranks() -> tuple[int, int]:
    """(this process's rank on its machine, ranks on its machine): torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE (0 and 1 when not set). bigload reads the launcher's environment here
    and nowhere else."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank: the process group's, else the launcher's RANK (0 when not set)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


@dataclass
class Group:
    """bigload's view of the process group: this rank, the world, where transfers are staged
    (``device``: the CPU for gloo, this rank's GPU for NCCL) and the timeout of every wait."""

    rank: int
    world_size: int
    data: Any  # the ProcessGroup activations travel on
    control: Any  # a gloo ProcessGroup for objects (agreement, errors)
    store: Any  # the rendezvous store: failing ranks leave their error there
    device: torch.device
    timeout_s: float
    gid: str  # names this group's keys in the store
    broken: bool = False
    epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self, *parts: object) -> str:
        return "/".join(["bigload", self.gid, *map(str, parts)])

    def break_up(self) -> None:
        """Close bigload's transfer groups: every rank still waiting on this one fails at
        once (its connections close) instead of at its timeout."""
        if self.broken:
            return
        self.broken = True
        for pg in {id(self.data): self.data, id(self.control): self.control}.values():
            try:
                dist.destroy_process_group(pg)
            except Exception as err:  # already gone with the default group
                logger.debug("destroying a bigload process group: %s", err)
        self.data = self.control = None


def join(world: int | str | None, *, timeout_s: float | None = None,
         backend: str | None = None) -> Group | None:
    """The group for ``world`` (``"auto"``: the process group's size; an int: checked against
    it; None or 1 with no process group: one process, returns None). Initialises
    torch.distributed from the environment when it is not yet (``backend``: nccl with GPUs,
    else gloo)."""
    if world in (None, 1) and not dist.is_initialized():
        return None
    timeout = float(timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S)
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        _init_from_env(backend, timeout)
    size = dist.get_world_size()
    if world not in ("auto", None) and world != size:
        raise DistributedError(
            f"world={world!r} but the process group has {size} rank(s); pass world='auto' or "
            "launch that many processes (torchrun --nproc-per-node N)")
    if size == 1:
        return None
    return _make_group(timeout)


def _init_from_env(backend: str | None, timeout_s: float) -> None:
    missing = [name for name in ENV if name not in os.environ]
    if missing:
        raise DistributedError(
            f"torch.distributed is not initialised and {', '.join(missing)} not set: launch "
            "with torchrun (torchrun --nproc-per-node 2 -m bigload run PATH --world auto), "
            "or call torch.distributed.init_process_group() first")
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if chosen == "nccl":
        torch.cuda.set_device(local_ranks()[0])
    dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))


def _make_group(timeout_s: float) -> Group:
    rank, size = dist.get_rank(), dist.get_world_size()
    delta = datetime.timedelta(seconds=timeout_s)
    ranks = list(range(size))
    backend = dist.get_backend()
    data = dist.new_group(ranks, timeout=delta)
    control = data if backend == "gloo" else dist.new_group(ranks, backend="gloo", timeout=delta)
    names: list[Any] = [None] * size
    dist.all_gather_object(names, uuid.uuid4().hex[:12] if rank == 0 else None, group=control)
    device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
              else torch.device("cpu"))
    store = dist.distributed_c10d._get_default_store()
    return Group(rank, size, data, control, store, device, timeout_s, names[0])
