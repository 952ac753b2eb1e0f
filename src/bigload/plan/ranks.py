"""Planning over torch.distributed ranks: units split into contiguous stages, one per rank,
balanced by bytes against each rank's memory; then each stage planned on its rank's own tiers
(GPUs → CPU → disk) by the one-rank solver. Pure: budgets come in, a ``DevicePlan`` goes out."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from ..devices import DISK, format_size
from ..errors import DeviceMapError, DoesNotFitError
from .budgets import Budgets, balanced_targets, headroom
from .placements import EVERY_RANK
from .solve import Placed, ReserveRule, is_offload
from .types import DevicePlan, PlannedUnit, RankSpec, check_prefetch, default_prefetch
from .types import main_device_for as choose_main
from .units import UnitSpec

_SEARCH_STEPS = 60  # bisection steps on the load ratio: far below one byte of any budget


@dataclass(frozen=True)
class RankOptions:
    """What every rank's own solve takes, as in ``plan_devices``."""

    strategy: str
    headroom_bytes: int | str | None
    prefetch: int | None
    offload_buffers: bool


Adjust = Callable[[list[UnitSpec]], list[UnitSpec]]
Place = Callable[[list[UnitSpec], Budgets, Mapping[str, int], str, ReserveRule, Adjust],
                 tuple[list[UnitSpec], Placed, tuple[str, ...]]]


def plan_ranks(
    units: list[UnitSpec],
    budgets: Sequence[Budgets],
    place: Place,
    *,
    extra_bytes: Mapping[str, int] | None,
    options: RankOptions,
    tie_groups: tuple[tuple[str, ...], ...],
    notes: tuple[str, ...],
) -> DevicePlan:
    """The plan of ``units`` over ``len(budgets)`` ranks (rank ``r`` has ``budgets[r]``);
    ``place`` plans one stage on one rank's tiers (the one-rank planner's own steps)."""
    world = len(budgets)
    everywhere = [u for u in units if u.is_tensor]
    units = [u for u in units if not u.is_tensor]
    extra = unit_extras(units, extra_bytes or {})
    ranks, basis = split_stages(units, extra, budgets)
    planned: list[PlannedUnit] = [_on_every_rank(u, budgets[0]) for u in everywhere]
    specs: list[RankSpec] = []
    resident: dict[str, str] = {}
    for r in range(world):
        mine = [k for k, rank in enumerate(ranks) if rank == r]
        spec, placed_units, buffers = _plan_rank(r, [units[k] for k in mine], ranks, units,
                                                 extra, budgets[r], options, place)
        specs.append(spec)
        planned.extend(placed_units)
        resident.update(buffers)
    order = {u.name: k for k, u in enumerate([*everywhere, *units])}
    planned.sort(key=lambda u: order[_root(u.name, order)])
    stage_notes = tuple(_stage_note(r, planned, specs[r]) for r in range(world))
    first = specs[0]
    return DevicePlan(
        units=tuple(planned), budgets=dict(first.budgets), main_device=first.main_device,
        reserve_bytes=first.reserve_bytes, strategy=options.strategy,
        offload_buffers=options.offload_buffers, prefetch=first.prefetch, tie_groups=tie_groups,
        tensor_placements=resident, budget_sources=dict(first.budget_sources),
        notes=(*notes, f"stages balanced over {basis}", *stage_notes),
        world_size=world, rank=0, ranks=tuple(specs),
    )


def _on_every_rank(unit: UnitSpec, budgets: Budgets) -> PlannedUnit:
    """A tensor of a split module: every rank reads it (the model's own code between units
    uses it, on whichever rank runs that code), on its main device."""
    main = choose_main(budgets.accelerators())
    return PlannedUnit(unit.name, main, unit.size_bytes,
                       f"{unit.why}; on every rank (read by each), on its main device",
                       unit.whole, unit.tied_to, rank=EVERY_RANK)


# --- what a unit costs its rank ----------------------------------------------------------------
def unit_extras(units: list[UnitSpec], extra_bytes: Mapping[str, int]) -> list[int]:
    """Bytes each unit's rank keeps for it besides weights. ``extra_bytes`` is keyed by module
    fqn: a unit that is or contains the module takes it, else the first unit inside it."""
    names = [u.name for u in units]
    result = [0] * len(units)
    for key, size in extra_bytes.items():
        k = _unit_for(names, key)
        if k is None:
            raise DeviceMapError(f"extra_bytes names {key!r}, which is in no unit of the model")
        result[k] += size
    return result


def _unit_for(names: list[str], key: str) -> int | None:
    covering = [k for k, n in enumerate(names)
                if n == key or n == "" or key.startswith(f"{n}.")]
    if covering:
        return max(covering, key=lambda k: len(names[k]))
    return next((k for k, n in enumerate(names) if n.startswith(f"{key}.")), None)


def stage_costs(units: list[UnitSpec], extra: list[int], ranks: Sequence[int]) -> list[int]:
    """Bytes per unit on its rank: weights, extras, and a duplicate of any tensor it shares with
    a unit of another rank (a tied embedding and head on different ranks: both read it)."""
    rank_of = {u.name: r for u, r in zip(units, ranks)}
    return [u.size_bytes + e + (u.shared_bytes if _split_tie(u, r, rank_of) else 0)
            for u, e, r in zip(units, extra, ranks)]


def _split_tie(unit: UnitSpec, rank: int, rank_of: Mapping[str, int]) -> bool:
    return unit.tied_to is not None and rank_of.get(unit.tied_to, rank) != rank


# --- stages ------------------------------------------------------------------------------------
def split_stages(
    units: list[UnitSpec], extra: list[int], budgets: Sequence[Budgets]
) -> tuple[list[int], str]:
    """The rank of each unit: contiguous stages in execution order, the largest stage as small
    as it can be while each fits its rank's capacity. Capacity is the accelerators of each rank
    when the model fits in them, else accelerators and CPU, else every bounded tier; when it
    fits in none, stages are in proportion to memory and each rank sends its surplus to disk."""
    tiers = (("accelerators", _memory(False)), ("accelerators and CPU", _memory(True)),
             ("every bounded tier", _bounded))
    for label, capacity in tiers:
        caps = [capacity(b) for b in budgets]
        if any(caps):
            ranks = _min_max_split(units, extra, caps)
            if ranks is not None:
                return ranks, f"{label} ({_caps_text(caps)})"
    caps = [_memory(True)(b) for b in budgets]
    if not any(caps):
        raise DoesNotFitError(
            f"no rank has a memory budget to plan {len(units)} units over {len(budgets)} ranks; "
            "give each rank max_memory (e.g. {'cpu': '8GiB'})")
    ranks = _proportional_split(units, extra, caps)
    return ranks, (f"accelerators and CPU ({_caps_text(caps)}), in proportion: the model does "
                   "not fit in memory, each rank sends its surplus to disk")


def _memory(with_cpu: bool) -> Callable[[Budgets], int]:
    def capacity(budgets: Budgets) -> int:
        return sum(b or 0 for p, b in budgets.limits.items()
                   if p != DISK and (with_cpu or p != "cpu"))
    return capacity


def _bounded(budgets: Budgets) -> int:
    return sum(b or 0 for b in budgets.limits.values())


def _caps_text(caps: list[int]) -> str:
    return ", ".join(f"rank {r}: {format_size(c)}" for r, c in enumerate(caps))


def _min_max_split(units: list[UnitSpec], extra: list[int], caps: list[int]) -> list[int] | None:
    """Bisect the largest stage's bytes: the smallest for which stages filled in order, each
    within that and its rank's capacity, hold every unit."""
    base = [u.size_bytes + e for u, e in zip(units, extra)]
    hi = max(caps)
    best = _fill(units, base, [min(hi, c) for c in caps])
    if best is None:
        return None
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        found = _fill(units, base, [min(mid, c) for c in caps])
        if found is None:
            lo = mid
        else:
            hi, best = mid, found
    return best


def _proportional_split(units: list[UnitSpec], extra: list[int], caps: list[int]) -> list[int]:
    """Stages in proportion to ``caps`` (a ratio bisected until the stages fit)."""
    base = [u.size_bytes + e for u, e in zip(units, extra)]
    total = sum(base) + sum(u.shared_bytes for u in units)
    lo, hi = 0.0, total / max(1, min(c for c in caps if c)) + 1.0
    best = _fill(units, base, [int(hi * c) for c in caps])
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        found = _fill(units, base, [int(mid * c) for c in caps])
        if found is None:
            lo = mid
        else:
            hi, best = mid, found
    return best  # type: ignore[return-value]


def _fill(units: list[UnitSpec], base: list[int], limits: list[int]) -> list[int] | None:
    """Ranks in order, each taking units while its bytes stay within its limit (a unit that
    shares a tensor with another rank's unit costs that tensor again)."""
    ranks: list[int] = []
    rank_of: dict[str, int] = {}
    r, load = 0, 0
    for unit, cost in zip(units, base):
        while True:
            here = cost + (unit.shared_bytes if _split_tie(unit, r, rank_of) else 0)
            if load + here <= limits[r]:
                break
            if r + 1 == len(limits):
                return None
            r, load = r + 1, 0
        load += here
        ranks.append(r)
        rank_of[unit.name] = r
    return ranks


# --- one rank ----------------------------------------------------------------------------------
def _plan_rank(
    rank: int, mine: list[UnitSpec], ranks: list[int], units: list[UnitSpec], extra: list[int],
    budgets: Budgets, options: RankOptions, place: Place,
) -> tuple[RankSpec, list[PlannedUnit], dict[str, str]]:
    """Rank ``rank``'s stage on its own tiers, by the one-rank planner's steps."""
    main = choose_main(budgets.accelerators())
    depth = default_prefetch(main) if options.prefetch is None else check_prefetch(
        options.prefetch)
    spec = RankSpec(main, _bounded_budgets(budgets), dict(budgets.sources), 0, depth)
    if not mine:
        return spec, [], {}
    rank_of = {u.name: r for u, r in zip(units, ranks)}
    extra_of = {u.name: e for u, e in zip(units, extra)}
    counted: dict[str, tuple[int, int, str | None]] = {}  # name -> (weights, extra, shared with)

    def adjust(stage: list[UnitSpec]) -> list[UnitSpec]:
        """Units as this rank counts them: extras (on a streamed unit's first piece) and the
        duplicate of a tensor shared with another rank's unit."""
        out, seen = [], set()
        for u in stage:
            key = u.piece_of or u.name
            e = extra_of.get(key, 0) if key not in seen else 0
            seen.add(key)
            dup = u.shared_bytes if _split_tie(u, rank, rank_of) else 0
            counted[u.name] = (u.size_bytes + dup, e, u.tied_to if dup else None)
            out.append(replace(u, size_bytes=u.size_bytes + e + dup,
                               tied_to=None if dup else u.tied_to))
        return out

    room = headroom(options.headroom_bytes, budgets, main)
    sized = adjust(mine)
    largest_whole = max((u.size_bytes for u in sized if u.whole), default=0)
    targets = balanced_targets(options.strategy, budgets, [u.size_bytes for u in sized],
                               largest_whole)
    try:
        try:
            stage, placed, _ = place(mine, budgets, targets, main,
                                     ReserveRule(room, options.offload_buffers, 1 + depth), adjust)
        except DoesNotFitError:
            if options.prefetch is not None or depth == 0:
                raise
            depth = 0  # as one rank: the read-ahead gives way where the room holds one unit
            stage, placed, _ = place(mine, budgets, targets, main,
                                     ReserveRule(room, options.offload_buffers, 1), adjust)
    except DoesNotFitError as err:
        raise DoesNotFitError(f"rank {rank}: {err}") from None
    reserve = ReserveRule(room, options.offload_buffers, 1 + depth).need(
        [u for u, (p, _) in zip(stage, placed) if is_offload(p, main)])
    planned = [_planned_unit(u, p, rank, counted[u.name], rank_of)
               for u, p in zip(stage, placed)]
    buffers = {} if options.offload_buffers else _resident(stage, placed, main)
    return replace(spec, reserve_bytes=reserve, prefetch=depth), planned, buffers


def _planned_unit(unit: UnitSpec, placed: tuple[str, str], rank: int,
                  counted: tuple[int, int, str | None], rank_of: Mapping[str, int]
                  ) -> PlannedUnit:
    placement, where = placed
    weights, extra, shared_with = counted
    reason = f"{unit.why}; {where}"
    if shared_with is not None:
        reason += (f"; reads its own copy of the tensor it shares with {shared_with!r} "
                   f"(rank {rank_of[shared_with]})")
    return PlannedUnit(unit.name, placement, weights, reason, unit.whole,
                       shared_with or unit.tied_to, rank=rank, extra_bytes=extra)


def _root(name: str, order: Mapping[str, int]) -> str:
    """The planned unit a name is, or is a piece of (a unit streamed in pieces)."""
    while name not in order and "." in name:
        name = name.rpartition(".")[0]
    return name


def _resident(units: list[UnitSpec], placed: Placed, main: str) -> dict[str, str]:
    return {fqn: main for u, (p, _) in zip(units, placed) if is_offload(p, main)
            for fqn in u.buffers}


def _bounded_budgets(budgets: Budgets) -> dict[str, int]:
    return {p: b for p, b in budgets.limits.items() if b is not None}


def _stage_note(rank: int, units: list[PlannedUnit], spec: RankSpec) -> str:
    mine = [u for u in units if u.rank == rank]
    if not mine:
        return f"rank {rank}: no units (its budgets are not needed)"
    weights = sum(u.size_bytes for u in mine)
    extra = sum(u.extra_bytes for u in mine)
    first, last = mine[0].name or "<whole model>", mine[-1].name or "<whole model>"
    return (f"rank {rank}: {len(mine)} units {first} … {last}, {format_size(weights)} of weights"
            + (f" + {format_size(extra)} besides (KV cache, logits)" if extra else "")
            + f", main device {spec.main_device}")
