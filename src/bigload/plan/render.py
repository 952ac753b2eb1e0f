"""A plan as people read it: its budgets and where each came from, a table of devices in aligned
columns, the disk tier and the decisions. ``table`` is the one table style of plans and load
reports."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from ..devices import DISK, format_size
from ..errors import format_problems
from .placements import EVERY_RANK, tier_key

if TYPE_CHECKING:
    from .types import DevicePlan, PlannedUnit


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


def render(plan: DevicePlan, *, details: bool = True) -> Iterator[str]:
    """The plan as text: a header with the budgets and where each came from, one row per device
    (aligned columns), then with ``details`` the disk tier, the decisions and the notes. A plan
    over several ranks has a row per rank and device."""
    if plan.world_size > 1:
        yield from _render_world(plan, details=details)
        return
    sized = [u for u in plan.units if u.size_bytes]
    yield (
        f"DevicePlan: {_plural(len(plan.units), 'unit')}, strategy {plan.strategy}, main "
        f"execution device {plan.main_device}, reserve {format_size(plan.reserve_bytes)}, prefetch "
        f"{plan.prefetch}"
    )
    yield f"budgets: {budgets_text(plan)}"
    yield ""
    yield from _render_devices(plan, sized)
    empty = [u for u in plan.units if not u.size_bytes]
    if empty:
        names = [f"{u.name or '<whole model>'}" + (f" (tied to {u.tied_to!r})" if u.tied_to else "")
                 for u in empty]
        shown = ", ".join(names[:5]) + (f" … and {len(names) - 5} more" if len(names) > 5 else "")
        yield f"without bytes of their own (not counted above): {shown}"
    if details:
        yield from _render_disk(sized)
        yield from _render_decisions(plan)
        yield from (f"note: {note}" for note in plan.notes)


def budgets_text(plan: DevicePlan) -> str:
    """``cpu 8.0 GiB (given), disk unbounded``: each budget and where it came from."""
    parts = []
    for placement in sorted({*plan.budgets, *plan.budget_sources}, key=tier_key):
        budget = plan.budgets.get(placement)
        source = plan.budget_sources.get(placement)
        value = "unbounded" if budget is None else format_size(budget)
        parts.append(f"{placement} {value}" + (f" ({source})" if source and
                                                source != "unbounded" else ""))
    return ", ".join(parts) or "none"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *,
          right: Collection[int] = ()) -> list[str]:
    """Aligned columns (``right``: the indices of right-aligned columns), the last one unpadded:
    the one table style of plans and reports."""
    rows = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _render_devices(plan: DevicePlan, sized: list[PlannedUnit]) -> list[str]:
    held: dict[str, list[str]] = {}
    for run in runs(sized):
        first, last = (u.name or "<whole model>" for u in (run[0], run[-1]))
        span = first if len(run) == 1 else f"{first} … {last}"
        held.setdefault(run[0].placement, []).append(span)
    counts = {p: sum(1 for u in sized if u.placement == p) for p in held}
    used = plan.bytes_per_device
    rows = []
    for placement in sorted({*held, *plan.budgets}, key=tier_key):
        budget = plan.budgets.get(placement)
        reserve = plan.reserve_bytes if placement == plan.main_device else 0
        rows.append([placement, str(counts.get(placement, 0)), format_size(used.get(placement, 0)),
                     format_size(reserve), "unbounded" if budget is None else format_size(budget),
                     ", ".join(held.get(placement, ["-"]))])
    return table(["device", "units", "planned", "reserve", "budget", "holds"], rows,
                 right={1, 2, 3, 4})


def _render_disk(sized: list[PlannedUnit]) -> Iterator[str]:
    on_disk = [u for u in sized if u.placement == DISK]
    if on_disk:
        yield ""
        total = format_size(sum(u.size_bytes for u in on_disk))
        yield f"to disk: {_plural(len(on_disk), 'unit')}, {total}"
        rows = table(["", ""], [[u.name or "<whole model>", format_size(u.size_bytes)]
                                for u in on_disk], right={1})[1:]
        yield format_problems(rows)


def _render_decisions(plan: DevicePlan) -> Iterator[str]:
    starts = [run[0] for run in runs(u for u in plan.units if u.size_bytes)]
    ties = [u for u in plan.units if u.tied_to is not None and u not in starts]
    yield ""
    yield "decisions:"
    where = (lambda u: f"rank {_rank(u.rank)} {u.placement}") if plan.world_size > 1 else (
        lambda u: u.placement)
    lines = [f"{u.name or '<whole model>'} → {where(u)}: {u.reason}" for u in [*starts, *ties]]
    yield format_problems(lines, limit=20)


# --- several ranks -----------------------------------------------------------------------------
def _render_world(plan: DevicePlan, *, details: bool) -> Iterator[str]:
    yield (f"DevicePlan: {_plural(len(plan.units), 'unit')} over {plan.world_size} ranks, "
           f"strategy {plan.strategy}")
    views = [plan.for_rank(r) for r in range(plan.world_size)]
    for view in views:
        yield (f"rank {view.rank}: main device {view.main_device}, reserve "
               f"{format_size(view.reserve_bytes)}, prefetch {view.prefetch}; budgets "
               f"{budgets_text(view)}")
    yield ""
    rows = []
    for view in views:
        rows += _rank_rows(view, view.rank)
    rows += _rank_rows(views[0], EVERY_RANK)  # on every rank: once
    yield from table(["rank", "device", "units", "planned", "besides", "reserve", "budget",
                      "holds"], rows, right={2, 3, 4, 5, 6})
    if details:
        for view in views:
            for line in _render_disk([u for u in view.local_units
                                      if u.size_bytes and u.rank == view.rank]):
                yield f"rank {view.rank} {line}" if line.startswith("to disk") else line
        yield from _render_decisions(plan)
        yield from (f"note: {note}" for note in plan.notes)


def _rank_rows(view: DevicePlan, rank: int) -> list[list[str]]:
    """One row per device of ``view``'s rank holding units of ``rank`` (its own, or those on
    every rank)."""
    by_place: dict[str, list[PlannedUnit]] = {}
    for unit in view.local_units:
        if unit.rank == rank:
            by_place.setdefault(unit.placement, []).append(unit)
    own = rank == view.rank
    rows = []
    for placement in sorted({*by_place, *(view.budgets if own else ())}, key=tier_key):
        mine = by_place.get(placement, [])
        spans = [r[0].name if len(r) == 1 else f"{r[0].name} … {r[-1].name}"
                 for r in runs(mine)] or ["-"]
        budget = view.budgets.get(placement)
        reserve = view.reserve_bytes if placement == view.main_device and own else 0
        rows.append([_rank(rank), placement, str(len(mine)),
                     format_size(sum(u.size_bytes for u in mine)),
                     format_size(sum(u.extra_bytes for u in mine)), format_size(reserve),
                     "-" if not own else "unbounded" if budget is None else format_size(budget),
                     ", ".join(spans)])
    return rows


def _rank(rank: int) -> str:
    return "all" if rank == EVERY_RANK else str(rank)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
