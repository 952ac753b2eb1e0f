"""A plan as people read it: its budgets and where each came from, a table of devices in aligned
columns, the disk tier and the decisions. ``table`` is the one table style of plans and load
reports."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
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


def render(plan: DevicePlan, *, details: bool = True) -> Iterator[str]:
    """The plan as text: a header with the budgets and where each came from, one row per device
    (aligned columns), then with ``details`` the disk tier, the decisions and the notes."""
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
    lines = [f"{u.name or '<whole model>'} → {u.placement}: {u.reason}" for u in [*starts, *ties]]
    yield format_problems(lines, limit=20)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
