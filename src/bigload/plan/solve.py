"""Assignment: units onto tiers (accelerators → CPU → disk) in execution order, never going back,
with the room the main device keeps for the offloaded units it runs. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..devices import DISK, format_size
from ..errors import DoesNotFitError, format_problems
from .budgets import Budgets
from .units import UnitSpec

_MAX_ROUNDS = 16


@dataclass(frozen=True)
class Tier:
    placement: str
    budget: int | None  # None: unbounded (disk)
    cap: int | None  # what planning may fill: the budget less the reserve, or a balanced share
    reserve: int


@dataclass(frozen=True)
class ReserveRule:
    """What the main execution device keeps free when units are offloaded to it."""

    headroom: int
    offload_buffers: bool
    resident_units: int  # the unit that runs plus those prefetched ahead

    def buffers(self, offloaded: list[UnitSpec]) -> int:
        return 0 if self.offload_buffers else sum(u.buffer_bytes for u in offloaded)

    def need(self, offloaded: list[UnitSpec]) -> int:
        if not offloaded:
            return 0
        largest = sorted((u.size_bytes for u in offloaded), reverse=True)
        return self.headroom + sum(largest[: self.resident_units]) + self.buffers(offloaded)


Placed = list[tuple[str, str]]  # (placement, why there) per unit


def solve(
    units: list[UnitSpec], budgets: Budgets, targets: Mapping[str, int], main: str,
    rule: ReserveRule,
) -> tuple[Placed, int]:
    """Assign, then grow the main device's reserve until it covers what the plan offloads.

    The reserve only grows (a larger reserve offloads more), so this settles in a few rounds;
    past ``_MAX_ROUNDS`` it takes the bound that covers any unit.
    """
    reserve = 0
    for _ in range(_MAX_ROUNDS):
        placed = assign(units, tiers(budgets, targets, main, reserve), main)
        need = rule.need(offloaded(units, placed, main))
        if need <= reserve:
            break
        reserve = need
    else:
        reserve = rule.need(units)
        placed = assign(units, tiers(budgets, targets, main, reserve), main)
    return placed, reserve


def tiers(budgets: Budgets, targets: Mapping[str, int], main: str, reserve: int) -> list[Tier]:
    result = []
    for placement, budget in budgets.limits.items():
        if budget == 0:
            continue
        kept = reserve if placement == main else 0
        cap = None if budget is None else max(0, budget - kept)
        if placement in targets:
            cap = min(cap, targets[placement])  # type: ignore[type-var]
        result.append(Tier(placement, budget, cap, kept))
    return result


def is_offload(placement: str, main: str) -> bool:
    return placement != main and placement in ("cpu", DISK)


def offloaded(units: list[UnitSpec], placed: Placed, main: str) -> list[UnitSpec]:
    return [u for u, (p, _) in zip(units, placed) if is_offload(p, main)]


def assign(units: list[UnitSpec], tier_list: list[Tier], main: str = "cpu") -> Placed:
    """(placement, why there) per unit: units in order, tiers filled in order, never back.

    A unit whose tensor later units share (a tie) takes them along where they all fit: room
    for them is kept on its tier, and they join it there. Where they do not fit together, it
    is placed alone and each later holder uses the tensor where it lives."""
    placed: Placed = []
    used = [0] * len(tier_list)
    partners = _partners(units)
    joined: dict[str, int] = {}  # unit name -> tier kept for it by the unit it shares with
    at, where = 0, "first device with room"
    for k, unit in enumerate(units):
        if unit.name in joined:
            placed.append((tier_list[joined[unit.name]].placement,
                           f"tie group: placed with {unit.tied_to!r}"))
            continue
        along = partners.get(unit.name, [])
        start = at
        while at < len(tier_list) and not fits(tier_list[at], used[at], unit.size_bytes):
            at += 1
        if at == len(tier_list):
            raise does_not_fit(units[k:], tier_list[start:], used[start:])
        if at != start:
            where = "; ".join(skip_reason(tier_list[t], used[t], unit.size_bytes)
                              for t in range(start, at))
        if unit.piece_of is not None and not _runs_on_main(tier_list[at].placement, main):
            placed.append((_offload_tier(tier_list, at, used, unit), where))
            continue
        used[at] += unit.size_bytes
        if along and fits(tier_list[at], used[at], sum(u.size_bytes for u in along)):
            used[at] += sum(u.size_bytes for u in along)
            joined.update(dict.fromkeys((u.name for u in along), at))
        placed.append((tier_list[at].placement, where + _borrowing(unit)))
    return placed


def _runs_on_main(placement: str, main: str) -> bool:
    """Whether units placed there run on the main device: the main device itself, the CPU or
    disk. A piece of a streamed unit never lands on another accelerator: the pieces of one
    unit run on one device."""
    return placement in (main, "cpu", DISK)


def _offload_tier(tier_list: list[Tier], at: int, used: list[int], unit: UnitSpec) -> str:
    for t in range(at, len(tier_list)):
        if tier_list[t].placement in ("cpu", DISK) and fits(tier_list[t], used[t],
                                                            unit.size_bytes):
            used[t] += unit.size_bytes
            return tier_list[t].placement
    raise does_not_fit([unit], tier_list[at:], used[at:])


def fill(units: list[UnitSpec], placed: Placed, budgets: Budgets, targets: Mapping[str, int],
         main: str, rule: ReserveRule) -> Placed:
    """Move disk units back to the memory tiers that still have room after the in-order pass
    (a large unit that went to disk must not leave the rest of a tier empty): the largest
    first, each onto the first memory tier it fits on, where a piece of a streamed unit may
    go (the main device or the CPU). Tiers holding a balanced share, and units in a tie, stay
    as they are."""
    placed = list(placed)
    memory = [p for p, b in budgets.limits.items() if p != DISK and b and p not in targets]
    tied = {u.name for u in units if u.tied_to is not None} | {
        u.tied_to for u in units if u.tied_to is not None}
    order = sorted((i for i, (p, _) in enumerate(placed) if p == DISK
                    and units[i].size_bytes and units[i].name not in tied),
                   key=lambda i: (-units[i].size_bytes, i))
    held = {p: 0 for p in memory}
    for unit, (p, _) in zip(units, placed):
        if p in held:
            held[p] += unit.size_bytes
    need = rule.need(offloaded(units, placed, main))  # only shrinks as units leave disk
    for i in order:
        for placement in memory:
            if units[i].piece_of and not _runs_on_main(placement, main):
                continue
            kept = need if placement == main else 0
            if held[placement] + units[i].size_bytes + kept > budgets.limits[placement]:
                continue
            placed[i] = (placement, f"filled back from disk: {placement} had room left after "
                                    "the in-order pass")
            held[placement] += units[i].size_bytes
            need = rule.need(offloaded(units, placed, main))
            break
    return placed


def _partners(units: list[UnitSpec]) -> dict[str, list[UnitSpec]]:
    """For each unit, the later units that share a tensor first held by it."""
    result: dict[str, list[UnitSpec]] = {}
    for unit in units:
        if unit.tied_to is not None:
            result.setdefault(unit.tied_to, []).append(unit)
    return result


def _borrowing(unit: UnitSpec) -> str:
    if unit.tied_to is None:
        return ""
    return f"; shares a tensor with {unit.tied_to!r}, which it uses where that unit keeps it"


def fits(tier: Tier, used: int, size: int) -> bool:
    return tier.cap is None or used + size <= tier.cap


def skip_reason(tier: Tier, used: int, size: int) -> str:
    free = format_size(max(0, (tier.budget or 0) - used))
    if tier.budget is not None and used + size > tier.budget:
        return f"{tier.placement} full ({free} free)"
    if tier.reserve and used + size > tier.budget - tier.reserve:  # type: ignore[operator]
        return f"{tier.placement} keeps a {format_size(tier.reserve)} reserve for offloaded units"
    return f"{tier.placement} has its balanced share ({format_size(tier.cap)})"  # type: ignore[arg-type]


def does_not_fit(rest: list[UnitSpec], tier_list: list[Tier], used: list[int]) -> DoesNotFitError:
    unit = rest[0]
    need = sum(u.size_bytes for u in rest)
    free = [max(0, t.cap - u) if t.cap is not None else 0 for t, u in zip(tier_list, used)]
    shortfall = max(need - sum(free), unit.size_bytes - max(free, default=0))
    lines = [
        f"{t.placement}: {format_size(f)} free of {format_size(t.budget)}"
        + (f" (reserve {format_size(t.reserve)})" if t.reserve else "")
        for t, f in zip(tier_list, free)
    ]
    return DoesNotFitError(
        f"the model does not fit: unit {unit.name or '<whole model>'!r} ({unit.why}, "
        f"{unit.size_bytes} bytes) fits on no device left, and {need} bytes remain to place; "
        f"short by {shortfall} bytes ({format_size(shortfall)}).\n"
        + format_problems(lines or ["no device has a budget"])
        + "\n"
        + _advice(unit, disk_allowed=any(t.placement == DISK for t in tier_list))
    )


def _advice(unit: UnitSpec, *, disk_allowed: bool) -> str:
    steps = ["raise max_memory", "load in a smaller dtype"]
    if not disk_allowed:
        steps.insert(1, 'allow disk offload (drop "disk": 0)')
    if unit.whole:
        steps.append(f"let {unit.name or 'the model'!r} split (no_split_module_classes)")
    return "To fix: " + ", ".join(steps) + "."


def check_main_device(
    units: list[UnitSpec], placed: Placed, budget: int | None, main: str, rule: ReserveRule
) -> None:
    """Offloaded units run on the main device: it must hold the largest of them at least."""
    moved = offloaded(units, placed, main)
    need = rule.need(moved)
    if budget is None or need <= budget:
        return
    largest = max(moved, key=lambda u: u.size_bytes)
    buffers = "" if rule.offload_buffers else f", their buffers {rule.buffers(moved)} bytes"
    raise DoesNotFitError(
        f"the main execution device {main} ({budget} bytes) cannot run the offloaded units: "
        f"they need {need} bytes there (largest offloaded unit {largest.name or '<whole model>'!r}"
        f" {largest.size_bytes} bytes, {rule.resident_units} unit(s) resident with prefetch, "
        f"headroom {rule.headroom} bytes{buffers}); short by {need - budget} bytes "
        f"({format_size(need - budget)}).\n"
        f"Raise max_memory for {main}, lower headroom_bytes, fetch fewer units ahead "
        "(prefetch=0), pass offload_buffers=True, or let large units split "
        "(no_split_module_classes)."
    )
