"""A plan as people read it (a table of runs, devices, the disk tier and the decisions) and as
accelerate-style maps show it (prefixes merged where a module sits on one device)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ..devices import DISK, format_size
from ..errors import format_problems
from .types import EVERY_RANK, PlannedUnit, tier_key

if TYPE_CHECKING:
    from .types import DevicePlan

V = TypeVar("V")


def runs(plan_units: Iterable[PlannedUnit]) -> list[list[PlannedUnit]]:
    """Consecutive units on the same placement (of the same rank)."""
    result: list[list[PlannedUnit]] = []
    for unit in plan_units:
        last = result[-1][0] if result else None
        if last is not None and (last.rank, last.placement) == (unit.rank, unit.placement):
            result[-1].append(unit)
        else:
            result.append([unit])
    return result


def render(plan: DevicePlan) -> Iterator[str]:
    if plan.world_size > 1:
        yield from _render_world(plan)
        return
    yield (
        f"DevicePlan: {len(plan.units)} units, strategy {plan.strategy}, main execution device "
        f"{plan.main_device}, reserve {format_size(plan.reserve_bytes)}, prefetch "
        f"{plan.prefetch}"
    )
    yield from _render_runs(plan)
    yield from _render_devices(plan)
    yield from _render_disk(plan)
    yield from _render_decisions(plan)
    yield from (f"note: {note}" for note in plan.notes)


def _render_runs(plan: DevicePlan) -> Iterator[str]:
    yield ""
    yield "| device | units | from | to | bytes |"
    yield "|---|---:|---|---|---:|"
    for run in runs(plan.units):
        first, last = (u.name or "<whole model>" for u in (run[0], run[-1]))
        size = format_size(sum(u.size_bytes for u in run))
        yield f"| {run[0].placement} | {len(run)} | {first} | {last} | {size} |"


def _render_devices(plan: DevicePlan) -> Iterator[str]:
    used = plan.bytes_per_device
    yield ""
    yield "| device | planned | reserve | budget | budget from |"
    yield "|---|---:|---:|---:|---|"
    for placement in sorted({*used, *plan.budgets}, key=tier_key):
        budget = plan.budgets.get(placement)
        reserve = plan.reserve_bytes if placement == plan.main_device else 0
        shown = "unbounded" if budget is None else format_size(budget)
        source = plan.budget_sources.get(placement, "")
        planned = format_size(used.get(placement, 0))
        yield f"| {placement} | {planned} | {format_size(reserve)} | {shown} | {source} |"


def _render_disk(plan: DevicePlan) -> Iterator[str]:
    on_disk = [u for u in plan.local_units if u.placement == DISK and u.size_bytes]
    if on_disk:
        yield ""
        yield f"to disk: {len(on_disk)} units, {format_size(sum(u.size_bytes for u in on_disk))}"
        yield format_problems(
            [f"{u.name or '<whole model>'}  {format_size(u.size_bytes)}" for u in on_disk]
        )


def _render_decisions(plan: DevicePlan) -> Iterator[str]:
    starts = [run[0] for run in runs(plan.units)]
    ties = [u for u in plan.units if u.tied_to is not None and u not in starts]
    yield ""
    yield "decisions:"
    where = (lambda u: f"rank {_rank(u.rank)} {u.placement}") if plan.world_size > 1 else (
        lambda u: u.placement)
    lines = [f"{u.name or '<whole model>'} → {where(u)}: {u.reason}" for u in [*starts, *ties]]
    yield format_problems(lines, limit=20)


# --- several ranks -----------------------------------------------------------------------------
def _render_world(plan: DevicePlan) -> Iterator[str]:
    yield (
        f"DevicePlan: {len(plan.units)} units over {plan.world_size} ranks, strategy "
        f"{plan.strategy}"
    )
    yield ""
    yield "| rank | device | units | from | to | bytes | besides weights |"
    yield "|---:|---|---:|---|---|---:|---:|"
    for run in runs(plan.units):
        first, last = (u.name or "<whole model>" for u in (run[0], run[-1]))
        size = format_size(sum(u.size_bytes for u in run))
        extra = format_size(sum(u.extra_bytes for u in run))
        yield (f"| {_rank(run[0].rank)} | {run[0].placement} | {len(run)} | {first} | {last} "
               f"| {size} "
               f"| {extra} |")
    yield ""
    yield "| rank | device | planned | reserve | budget | budget from |"
    yield "|---:|---|---:|---:|---:|---|"
    for r in range(plan.world_size):
        yield from _rank_devices(plan.for_rank(r))
    for r in range(plan.world_size):
        view = plan.for_rank(r)
        yield from (f"rank {r} {line.lstrip()}" for line in _render_disk(view) if line)
    yield from _render_decisions(plan)
    yield from (f"note: {note}" for note in plan.notes)


def _rank(rank: int) -> str:
    return "all" if rank == EVERY_RANK else str(rank)


def _rank_devices(view: DevicePlan) -> Iterator[str]:
    used: dict[str, int] = {}
    for unit in view.local_units:
        used[unit.placement] = used.get(unit.placement, 0) + unit.size_bytes + unit.extra_bytes
    for placement in sorted({*used, *view.budgets}, key=tier_key):
        budget = view.budgets.get(placement)
        reserve = view.reserve_bytes if placement == view.main_device else 0
        shown = "unbounded" if budget is None else format_size(budget)
        source = view.budget_sources.get(placement, "")
        yield (f"| {view.rank} | {placement} | {format_size(used.get(placement, 0))} | "
               f"{format_size(reserve)} | {shown} | {source} |")


def merge_prefixes(mapping: Mapping[str, V], module_name: str = "") -> dict[str, V]:
    """``mapping`` (fqn prefix → value) with the keys under each module that all hold one value
    merged into the module's key; the order of first appearance is kept."""
    prefix = f"{module_name}." if module_name else ""
    inside = [(k, v) for k, v in mapping.items() if k == module_name or k.startswith(prefix)]
    merged = iter(_merge(inside, module_name))
    rebuilt: dict[str, Any] = {}
    for key, value in mapping.items():
        if key == module_name or key.startswith(prefix):
            rebuilt.update(merged)
        else:
            rebuilt[key] = value
    return rebuilt


def _merge(items: list[tuple[str, Any]], name: str) -> list[tuple[str, Any]]:
    if len(items) <= 1:
        return items
    if all(value == items[0][1] for _, value in items):
        return [(name, items[0][1])]
    depth = name.count(".") + 1 if name else 0
    groups: dict[str, list[tuple[str, Any]]] = {}
    for key, value in items:
        groups.setdefault(".".join(key.split(".")[: depth + 1]), []).append((key, value))
    return [pair for child, group in groups.items() for pair in _merge(group, child)]
