"""Activations between ranks over torch.distributed: point-to-point to the rank that needs a
value, broadcast when every rank does. Tensors travel as their bytes (any dtype), staged on the
group's device; every wait is bounded by the group's timeout, and a failed wait becomes a
RankFailedError that names the rank at fault."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import DistributedError
from .faults import peer_failure
from .group import Group


def _wire(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8).to(device)


def _unwire(buf: torch.Tensor, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    dtype = like.dtype
    raw = buf.to(device)
    value = raw.view(torch.uint8).view(torch.bool) if dtype == torch.bool else raw.view(dtype)
    return value.reshape(like.shape)


def _nbytes(like: torch.Tensor) -> int:
    return like.numel() * like.element_size()


def send(group: Group, tensor: torch.Tensor, dst: int) -> None:
    """Send ``tensor``'s value to rank ``dst`` (which calls :func:`recv` at the same point)."""
    _check(group)
    if tensor.numel() == 0:
        return
    try:
        dist.send(_wire(tensor, group.device), dst=dst, group=group.data)
    except RuntimeError as err:
        raise peer_failure(group, err, peer=dst) from err


def recv(group: Group, like: torch.Tensor, src: int, device: torch.device) -> torch.Tensor:
    """The value of ``like`` (shape and dtype; it may be on meta) sent by rank ``src``, on
    ``device``."""
    _check(group)
    if like.numel() == 0:
        return torch.empty(like.shape, dtype=like.dtype, device=device)
    buf = torch.empty(_nbytes(like), dtype=torch.uint8, device=group.device)
    try:
        dist.recv(buf, src=src, group=group.data)
    except RuntimeError as err:
        raise peer_failure(group, err, peer=src) from err
    return _unwire(buf, like, device)


def broadcast(group: Group, tensor: torch.Tensor, src: int, device: torch.device) -> torch.Tensor:
    """``tensor`` from rank ``src`` on every rank (the others pass one of the same shape and
    dtype, e.g. on meta), on ``device``."""
    _check(group)
    if tensor.numel() == 0:
        return tensor if group.rank == src else torch.empty(
            tensor.shape, dtype=tensor.dtype, device=device)
    if group.rank == src:
        buf = _wire(tensor, group.device)
    else:
        buf = torch.empty(_nbytes(tensor), dtype=torch.uint8, device=group.device)
    try:
        dist.broadcast(buf, src=src, group=group.data)
    except RuntimeError as err:
        raise peer_failure(group, err, peer=src) from err
    return tensor if group.rank == src else _unwire(buf, tensor, device)


def all_gather_object(group: Group, value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (small objects: facts, hashes, budgets)."""
    _check(group)
    out: list[Any] = [None] * group.world_size
    try:
        dist.all_gather_object(out, value, group=group.control)
    except RuntimeError as err:
        raise peer_failure(group, err) from err
    return out


def _check(group: Group) -> None:
    if group.broken:
        raise DistributedError(
            "this model's ranks failed earlier and its process group is closed; load it again")
