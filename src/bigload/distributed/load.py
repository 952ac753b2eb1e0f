"""``bigload.load(path, world=...)`` across ranks: the ranks join (or initialise) the process
group and fail together from then on; they agree on versions, checkpoint, plan and memory before
any weight is read; each reads only the tensors of its own stage, dispatches them on its own
tiers, and joins the lockstep runtime. The rest is ``hf.load``'s own composition."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from ..checkpoint import CheckpointIndex
from ..devices import accelerator_type
from ..errors import DistributedError
from ..plan import STRATEGIES, Budgets, DevicePlan, read_budgets
from ..plan.budgets import CPU_FRACTION, detected_budgets
from ..plan.types import tier_key
from . import transport
from .agree import check_memory, check_same_plan, gather_facts
from .faults import failing_together
from .group import Group, join, local_ranks
from .units import attach

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def across_ranks(options: Any) -> Iterator[Any]:
    """``options`` with the joined group (``options.ranks``); a load inside fails on every rank
    when it fails on one. With one process, the options for a one-process load."""
    group = join(options.world, timeout_s=options.timeout)
    if group is None:
        memory = None if options.max_memory == "auto" else options.max_memory
        yield dataclasses.replace(options, world=None, max_memory=memory)
        return
    with failing_together(group):
        yield dataclasses.replace(options, ranks=group)
        transport.all_gather_object(group, "loaded")  # every rank is ready, or every rank fails


def plan_stage(group: Group, stored: CheckpointIndex, device_map: Any, max_memory: Any,
               planner: Callable[[list[Budgets]], DevicePlan]) -> DevicePlan:
    """The plan over every rank, made and checked by each: this rank's view of it.
    ``stored`` (the checkpoint as stored) is what the ranks compare; ``planner`` plans the
    model over every rank's budgets (``hf.plan_model`` with the load's options)."""
    if not isinstance(device_map, str) or device_map not in STRATEGIES:
        raise DistributedError(
            f"device_map={device_map!r}: across ranks bigload plans the stages itself; "
            f"use a strategy ({', '.join(STRATEGIES)}) and max_memory")
    budgets = rank_budgets(max_memory, group.rank, group.world_size)
    facts = gather_facts(group, stored, budgets, [stored.root / "config.json"])
    plan = planner([f.budgets for f in facts])
    check_same_plan(group, plan)
    if max_memory not in (None, "auto"):
        check_memory(group, plan, facts[group.rank].host)
    return plan.for_rank(group.rank)


def join_lockstep(group: Group, model: nn.Module, view: DevicePlan) -> None:
    """``model`` (this rank's stage loaded and dispatched) runs its calls with the others."""
    attach(model, view, group)


def rank_budgets(max_memory: Any, rank: int, world: int) -> Budgets:
    """This rank's budgets: given (one mapping for every rank, or one per rank) or, for None /
    ``"auto"``, detected here. Ranks that share a machine (torchrun sets LOCAL_WORLD_SIZE)
    share it: each takes its own accelerators (index mod the local world size = its local
    rank) and its part of the RAM."""
    if max_memory in (None, "auto"):
        return _shared_machine(*detected_budgets(CPU_FRACTION))
    if isinstance(max_memory, Mapping):
        return read_budgets(max_memory)
    if isinstance(max_memory, Sequence) and not isinstance(max_memory, (str, bytes)):
        if len(max_memory) != world:
            raise DistributedError(
                f"max_memory has {len(max_memory)} entries for {world} ranks: give one mapping "
                "per rank, one for every rank, or 'auto'")
        return read_budgets(max_memory[rank])
    raise DistributedError(f"max_memory={max_memory!r}: give 'auto', a mapping or one per rank")


def _shared_machine(limits: dict[str, int | None], sources: dict[str, str]) -> Budgets:
    local, count = local_ranks()
    kind = accelerator_type()
    kept: dict[str, int | None] = {}
    for placement, budget in limits.items():
        if placement == "cpu" and count > 1:
            kept[placement] = None if budget is None else budget // count
            sources[placement] += f", shared by {count} ranks on this machine"
        elif kind and placement.startswith(kind) and count > 1:
            if int(placement.partition(":")[2] or 0) % count == local:
                kept[placement] = budget
        else:
            kept[placement] = budget
    kept.setdefault("disk", None)
    sources.setdefault("disk", "unbounded")
    order = sorted(kept, key=tier_key)
    return Budgets({p: kept[p] for p in order}, {p: sources[p] for p in order})
