"""A plan as people read it: a table of runs, devices (with where each budget came from), the
disk tier and the decisions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ..devices import DISK, format_size
from ..errors import format_problems
from .placements import tier_key

if TYPE_CHECKING:
    from .types import DevicePlan, PlannedUnit


def runs(plan_units: Iterable[PlannedUnit]) -> list[list[PlannedUnit]]:
    """Consecutive units on the same placement."""
    result: list[list[PlannedUnit]] = []
    for unit in plan_units:
        if result and result[-1][0].placement == unit.placement:
            result[-1].append(unit)
        else:
            result.append([unit])
    return result


def render(plan: DevicePlan) -> Iterator[str]:
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
    on_disk = [u for u in plan.units if u.placement == DISK and u.size_bytes]
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
    lines = [f"{u.name or '<whole model>'} → {u.placement}: {u.reason}" for u in [*starts, *ties]]
    yield format_problems(lines, limit=20)
