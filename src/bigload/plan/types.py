"""The device plan: where every unit of a model lives and where it runs. It is the one object the
stages hand each other (load, dispatch); frozen, printable, and round-trips through JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

import torch

from ..devicemap import covering_entry
from ..devices import DISK, Placement, is_accelerator, parse_placement
from ..errors import DeviceMapError
from .placements import EVERY_RANK, JSON_FORMAT, merge_prefixes, tier_key
from .plan_json import parse_plan_json
from .render import render


@dataclass(frozen=True)
class PlannedUnit:
    """A module or tensor placed as one piece; ``name`` is its fqn (``""`` = the whole model).

    ``placement`` is canonical text (``"cuda:0"``, ``"cpu"``, ``"disk"``); ``whole`` says a
    no-split rule kept it whole; ``tied_to`` names the unit that holds a tensor it shares;
    ``hook_at`` names an enclosing module whose forward reads the unit's weights directly
    (``preload_module_classes``): the unit pages in around that module's forward.
    ``rank`` is the torch.distributed rank that holds and runs it (0 in a one-process plan;
    ``EVERY_RANK`` for a tensor of a split module, which every rank reads: the model's own code
    between units uses it); ``extra_bytes`` is what its rank keeps for it besides weights (its
    KV cache, logits).
    """

    name: str
    placement: str
    size_bytes: int
    reason: str
    whole: bool = False
    tied_to: str | None = None
    hook_at: str | None = None  # the module whose forward pages it in, when not its own
    rank: int = 0
    extra_bytes: int = 0

    @property
    def target(self) -> Placement:
        """The placement, parsed: a ``torch.device`` or ``"disk"``."""
        return parse_placement(self.placement, check_available=False)


@dataclass(frozen=True)
class RankSpec:
    """What one rank of a multi-rank plan has: its main device, budgets (and where each came
    from), the reserve kept on its main device and its prefetch depth."""

    main_device: str
    budgets: Mapping[str, int]
    budget_sources: Mapping[str, str] = field(default_factory=dict)
    reserve_bytes: int = 0
    prefetch: int = 0


@dataclass(frozen=True)
class DevicePlan:
    """Where every unit goes, in execution order, and what the later stages need to run it.

    ``main_device`` runs every offloaded unit (CPU- or disk-placed while it is not the CPU
    itself, or disk-placed). ``reserve_bytes`` is the room kept free there for them;
    ``prefetch`` is how many offloaded units are fetched ahead of the one that runs (the
    reserve holds ``1 + prefetch`` of them). ``budgets`` has no ``"disk"`` key when disk is
    unbounded; ``budget_sources`` says where each budget came from. ``tie_groups`` lists the
    fqns that share one tensor: the tensor lives where its first member's unit is placed.
    ``tensor_placements`` places single tensors apart from their unit: the buffers of
    offloaded units stay on the main device unless ``offload_buffers``.

    Over several ranks (``world_size > 1``) every unit names its ``rank``, ``ranks`` holds
    each rank's budgets and main device, and the plan is seen from ``rank``: ``main_device``,
    ``budgets``, ``budget_sources``, ``reserve_bytes`` and ``prefetch`` are that rank's
    (:meth:`for_rank` gives another rank's view). Tensors of other ranks' units stay on
    ``meta`` on this rank, on purpose: :meth:`holds` says which tensors this rank holds.
    """

    units: tuple[PlannedUnit, ...]
    budgets: Mapping[str, int]
    main_device: str
    reserve_bytes: int = 0
    strategy: str = "auto"
    offload_buffers: bool = False
    prefetch: int = 0
    tie_groups: tuple[tuple[str, ...], ...] = ()
    tensor_placements: Mapping[str, str] = field(default_factory=dict)
    budget_sources: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    world_size: int = 1
    rank: int = 0
    ranks: tuple[RankSpec, ...] = ()

    # --- ranks ---------------------------------------------------------------------------------
    def for_rank(self, rank: int) -> DevicePlan:
        """This plan as rank ``rank`` sees it: its budgets and main device, and each tie group
        led by a member this rank holds (a tensor shared across ranks is read by each)."""
        if not 0 <= rank < self.world_size:
            raise DeviceMapError(f"rank {rank} is not in this plan of {self.world_size} rank(s)")
        if self.world_size == 1:
            return self
        spec = self.ranks[rank]
        by_name = self._by_name
        groups = tuple(_local_first(g, lambda n: _rank_of(by_name, n) in (rank, EVERY_RANK))
                       for g in self.tie_groups)
        units = tuple(replace(u, placement=spec.main_device) if u.rank == EVERY_RANK else u
                      for u in self.units)
        return replace(
            self, rank=rank, units=units, main_device=spec.main_device,
            budgets=dict(spec.budgets), budget_sources=dict(spec.budget_sources),
            reserve_bytes=spec.reserve_bytes, prefetch=spec.prefetch, tie_groups=groups)

    def rank_of(self, fqn: str) -> int:
        """The rank whose unit holds tensor (or module) ``fqn``; a tied alias is held where its
        group's first member is (in this rank's view, a member it holds if any)."""
        unit = self.unit_of(self._tie_leader.get(fqn, fqn))
        return unit.rank if unit is not None else self.rank

    def holds(self, fqn: str) -> bool:
        """Whether this rank holds tensor ``fqn`` (always, in a one-process plan)."""
        return self.world_size == 1 or self.rank_of(fqn) in (self.rank, EVERY_RANK)

    @property
    def local_units(self) -> tuple[PlannedUnit, ...]:
        """The units this rank holds and runs, in execution order."""
        if self.world_size == 1:
            return self.units
        return tuple(u for u in self.units if u.rank in (self.rank, EVERY_RANK))

    # --- where things are ----------------------------------------------------------------------
    @cached_property
    def main(self) -> torch.device:
        """``main_device`` parsed."""
        return torch.device(self.main_device)

    @cached_property
    def _by_name(self) -> dict[str, PlannedUnit]:
        return {u.name: u for u in self.units}

    @cached_property
    def _tie_leader(self) -> dict[str, str]:
        return {fqn: group[0] for group in self.tie_groups for fqn in group[1:]}

    def unit_of(self, fqn: str) -> PlannedUnit | None:
        """The unit that holds ``fqn`` (a module or tensor fqn): the longest unit-name prefix."""
        found = covering_entry(self._by_name, fqn)
        return found[1] if found else None

    def placement_of(self, fqn: str) -> Placement:
        """Where tensor (or module) ``fqn`` lives; a tied alias lives with its group's first
        member."""
        if fqn in self.tensor_placements:
            return parse_placement(self.tensor_placements[fqn], check_available=False)
        unit = self.unit_of(self._tie_leader.get(fqn, fqn))
        if unit is None:
            raise DeviceMapError(
                f"{fqn!r} is in no unit of this plan; was it planned for this model?"
            )
        return unit.target

    def memory_device(self, fqn: str) -> torch.device:
        """The device of a tensor that lives in memory (a non-persistent buffer, a tensor
        initialised for a disk unit): its placement, or the main device when that is disk or
        when no unit holds it, or another rank's unit does."""
        if fqn not in self.tensor_placements and self.unit_of(fqn) is None:
            return self.main
        if not self.holds(fqn):
            return self.main
        placement = self.placement_of(fqn)
        return self.main if placement == DISK else placement  # type: ignore[return-value]

    def is_offloaded(self, unit: PlannedUnit) -> bool:
        """Whether ``unit`` lives away from where it runs (disk, or CPU with an accelerator
        as the main device)."""
        return unit.placement == DISK or (unit.placement == "cpu" and self.main.type != "cpu")

    def execution_device(self, unit: PlannedUnit) -> torch.device:
        """Where ``unit`` runs: its own accelerator, else the main device."""
        target = unit.target
        return target if is_accelerator(target) else self.main  # type: ignore[return-value]

    @property
    def offloaded(self) -> tuple[PlannedUnit, ...]:
        """Units that run on ``main_device`` but live on the CPU or on disk."""
        return tuple(u for u in self.local_units if self.is_offloaded(u))

    @property
    def single_placement(self) -> Placement | None:
        """The one placement of a plan that puts the whole model on one device and runs it
        there (no hooks needed), else None."""
        placements = {u.placement for u in self.local_units}
        if len(placements) != 1 or self.offloaded:
            return None
        return self.local_units[0].target

    @property
    def device_map(self) -> dict[str, Placement]:
        """accelerate-style map (fqn prefix → placement), merged where a module is on one
        device."""
        placed = {u.name: u.target for u in self.units}
        placed.update((fqn, parse_placement(p, check_available=False))
                      for fqn, p in self.tensor_placements.items())
        return merge_prefixes(placed)

    @property
    def bytes_per_device(self) -> dict[str, int]:
        """Planned bytes per placement of this rank, in tier order (devices that got nothing
        are left out)."""
        totals: dict[str, int] = {}
        for unit in sorted(self.local_units, key=lambda u: tier_key(u.placement)):
            totals[unit.placement] = totals.get(unit.placement, 0) + unit.size_bytes
        return totals

    # --- text and JSON -------------------------------------------------------------------------
    def __str__(self) -> str:
        return "\n".join(render(self))

    def to_json(self, *, indent: int | None = None) -> str:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["units"] = [asdict(u) for u in self.units]
        for name in ("budgets", "budget_sources", "tensor_placements"):
            data[name] = dict(getattr(self, name))
        data["ranks"] = [{**asdict(r), "budgets": dict(r.budgets),
                          "budget_sources": dict(r.budget_sources)} for r in self.ranks]
        return json.dumps({"format": JSON_FORMAT, **data}, indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> DevicePlan:
        """The plan written by :meth:`to_json`; anything else is a DeviceMapError that names the
        field at fault."""
        fields = parse_plan_json(text)
        fields["units"] = tuple(PlannedUnit(**unit) for unit in fields["units"])
        fields["ranks"] = tuple(RankSpec(**spec) for spec in fields["ranks"])
        return cls(**fields)


def _rank_of(by_name: Mapping[str, PlannedUnit], fqn: str) -> int | None:
    found = covering_entry(by_name, fqn)
    return found[1].rank if found else None


def _local_first(group: tuple[str, ...], local: Any) -> tuple[str, ...]:
    first = next((name for name in group if local(name)), None)
    if first is None or first == group[0]:
        return group
    return (first, *(name for name in group if name != first))


def main_device_for(placements: Iterable[str], given: str | None = None) -> str:
    """The one rule for the main (execution) device: ``given``, else the first accelerator
    among ``placements`` (in tier order), else the CPU."""
    if given is not None:
        return given
    accelerators = [p for p in placements if p not in ("cpu", DISK)]
    return min(accelerators, key=tier_key) if accelerators else "cpu"


PREFETCH = 1


def default_prefetch(main_device: str) -> int:
    """Units fetched ahead by default: one, whatever the main device. A disk unit is read into
    the streaming pool by background threads while the one before it computes (on 2 cores,
    half of a 268 MB model on disk: 0.26-0.28 s a step with one read ahead, 0.47-0.50 s with
    none); on an accelerator the host-to-device copies overlap compute as well. The planner
    keeps room for it (the reserve holds ``1 + prefetch`` offloaded units)."""
    del main_device
    return PREFETCH


def check_prefetch(prefetch: Any) -> int:
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise DeviceMapError(f"prefetch={prefetch!r}: give a number of units >= 0 (or None)")
    return prefetch
