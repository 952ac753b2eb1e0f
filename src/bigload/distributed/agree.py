"""Before any weight is read, the ranks agree: same versions, same checkpoint (a fingerprint of
its headers, file sizes and config), the same plan (a hash of its JSON), and enough memory on
each rank for its stage. Any disagreement is the same typed error on every rank."""

from __future__ import annotations

import hashlib
import platform
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointIndex
from ..devices import DISK, format_size, free_memory_bytes
from ..errors import DoesNotFitError, RankMismatchError, format_problems
from ..plan import Budgets, DevicePlan
from . import transport
from .group import Group


@dataclass(frozen=True)
class Facts:
    """What one rank brings to the agreement."""

    rank: int
    host: str
    versions: tuple[tuple[str, str], ...]
    checkpoint: str  # fingerprint
    checkpoint_summary: str
    budgets: Budgets


def versions() -> tuple[tuple[str, str], ...]:
    """The versions every rank must share: bigload, torch, transformers (when loaded), Python."""
    from .. import __version__

    found = [("bigload", __version__), ("torch", torch.__version__),
             ("python", platform.python_version())]
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        found.append(("transformers", transformers.__version__))
    return tuple(found)


def checkpoint_fingerprint(index: CheckpointIndex, extra_files: list[Path] = ()) -> tuple[str, str]:
    """(fingerprint, summary) of a checkpoint from what its headers say: every tensor's name,
    dtype, shape and byte range, each file's name and size, and ``extra_files`` (config.json)
    by content. Tensor values are not read (the fingerprint costs no weight bytes): two files
    with the same header and other values are not told apart."""
    h = hashlib.sha256()
    for name in sorted(index.entries):
        e = index.entries[name]
        h.update(f"{name}|{e.dtype}|{tuple(e.shape)}|{e.byte_range}|{e.file.name}\n".encode())
    total = 0
    for path in index.files:
        size = path.stat().st_size
        total += size
        h.update(f"{path.name}|{size}\n".encode())
    for path in extra_files:
        if path.is_file():
            h.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    summary = (f"{len(index.files)} file(s), {len(index.entries)} tensors, "
               f"{format_size(total)}")
    return h.hexdigest()[:32], summary


def gather_facts(group: Group, index: CheckpointIndex, budgets: Budgets,
                 extra_files: list[Path]) -> list[Facts]:
    """Every rank's facts, checked: versions and checkpoint must match rank 0's."""
    fingerprint, summary = checkpoint_fingerprint(index, extra_files)
    mine = Facts(group.rank, socket.gethostname(), versions(), fingerprint, summary, budgets)
    facts = transport.all_gather_object(group, mine)
    _check_same(facts, lambda f: f.versions, "versions",
                lambda f: ", ".join(f"{k} {v}" for k, v in f.versions),
                "install the same versions on every machine")
    _check_same(facts, lambda f: f.checkpoint, "checkpoint",
                lambda f: f"{f.checkpoint_summary}, fingerprint {f.checkpoint}",
                "give every rank the same checkpoint (a copy on each machine is fine)")
    return facts


def _check_same(facts: list[Facts], key: Any, what: str, show: Any, fix: str) -> None:
    differ = [f for f in facts if key(f) != key(facts[0])]
    if not differ:
        return
    lines = [f"rank {f.rank} ({f.host}): {show(f)}" for f in [facts[0], *differ]]
    raise RankMismatchError(
        f"the ranks were launched with different {what}; nothing was loaded:\n"
        + format_problems(lines) + f"\nTo fix: {fix}.", [f.rank for f in differ])


def check_same_plan(group: Group, plan: DevicePlan) -> str:
    """The plan's hash, the same on every rank (each computes the plan itself)."""
    digest = hashlib.sha256(plan.to_json().encode()).hexdigest()[:32]
    hashes = transport.all_gather_object(group, digest)
    differ = [r for r, d in enumerate(hashes) if d != hashes[0]]
    if differ:
        raise RankMismatchError(
            f"rank(s) {differ} computed another plan than rank 0 (plan hashes "
            f"{[hashes[r] for r in differ]} vs {hashes[0]}): the ranks were given other "
            "planning options (max_memory, dtype, no_split_module_classes, strategy); nothing "
            "was loaded. Launch every rank with the same options.", differ)
    return digest


def check_memory(group: Group, plan: DevicePlan, host: str) -> None:
    """Each rank has the memory its stage is planned to use, now (given budgets may be more
    than a machine has); else DoesNotFitError on every rank, naming the ranks short of it."""
    view = plan.for_rank(group.rank)
    problems = []
    for placement, needed in planned_bytes(view).items():
        device = torch.device(placement)
        free = free_memory_bytes(device)
        if needed > free:
            problems.append(f"rank {group.rank} ({host}): its stage needs {format_size(needed)} "
                            f"on {placement}, which has {format_size(free)} free")
    found = [p for ps in transport.all_gather_object(group, problems) for p in ps]
    if found:
        raise DoesNotFitError(
            "a rank has not the memory its stage is planned to use; nothing was loaded:\n"
            + format_problems(found) + "\nTo fix: lower max_memory for those ranks (or pass "
            "max_memory='auto' to plan with each rank's free memory), or add ranks.")


def planned_bytes(view: DevicePlan) -> dict[str, int]:
    """Bytes this rank's stage keeps in each memory placement: its units' weights and extras,
    and the reserve on its main device."""
    needed: dict[str, int] = {}
    for unit in view.local_units:
        if unit.placement != DISK:
            needed[unit.placement] = needed.get(unit.placement, 0) + (
                unit.size_bytes + unit.extra_bytes)
    if view.offloaded:
        needed[view.main_device] = needed.get(view.main_device, 0) + view.reserve_bytes
    return needed
