"""Device planning: decide where every tensor goes (accelerators → CPU → disk) before loading.

Pure: sizes + budgets + rules (no-split units, tie groups, reserve) → a frozen ``DevicePlan``.
Disk is the last resort unless ``max_memory`` says ``"disk": 0`` (see :func:`plan_devices`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from torch import nn

from .devicemap import covering_entry
from .devices import (
    DISK,
    DeviceLike,
    Placement,
    accelerator_count,
    accelerator_type,
    format_size,
    free_memory_bytes,
    parse_max_memory,
    parse_placement,
    parse_size,
    placement_str,
)
from .errors import DeviceMapError, DoesNotFitError, format_problems
from .sizes import DtypeLike, TensorSize, module_sizes, named_tensors, sizes_from_index
from .sizes import tensor_sizes as measure_tensors

logger = logging.getLogger(__name__)

Strategy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
HEADROOM_FRACTION = 0.05  # of the main accelerator's budget, kept for activations when offloading
CPU_FRACTION = 0.9  # of available RAM, the CPU budget when max_memory is not given
_MAX_ROUNDS = 16
_JSON_FORMAT = "bigload.DevicePlan/1"


# --- the plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedUnit:
    """A module or tensor placed as one piece; ``name`` is its fqn (``""`` = the whole model)."""

    name: str
    placement: str
    size_bytes: int
    reason: str


@dataclass(frozen=True)
class DevicePlan:
    """Where every unit goes, in execution order, and the budgets it was planned against.

    ``budgets`` has no ``"disk"`` key when disk is unbounded. ``reserve_bytes`` is the room kept
    free on ``main_device`` (largest offloaded unit + headroom + offloaded buffers).
    """

    units: tuple[PlannedUnit, ...]
    budgets: Mapping[str, int]
    main_device: str
    reserve_bytes: int = 0
    strategy: str = "auto"
    offload_buffers: bool = False
    notes: tuple[str, ...] = ()

    @property
    def device_map(self) -> dict[str, Placement]:
        """accelerate-style map (fqn prefix → placement), merged where a module is on one device."""
        raw = {u.name: parse_placement(u.placement, check_available=False) for u in self.units}
        return clean_device_map(raw)

    @cached_property
    def _placements(self) -> dict[str, str]:
        return {u.name: u.placement for u in self.units}

    def placement_of(self, fqn: str) -> Placement:
        """Placement of a tensor or module fqn (longest unit-name prefix)."""
        found = covering_entry(self._placements, fqn)
        if found is None:
            raise DeviceMapError(
                f"{fqn!r} is in no unit of this plan; was it planned for this model?"
            )
        return parse_placement(found[1], check_available=False)

    @property
    def bytes_per_device(self) -> dict[str, int]:
        """Planned bytes per placement, in tier order (devices that got nothing are left out)."""
        totals: dict[str, int] = {}
        for unit in sorted(self.units, key=lambda u: _tier_key(u.placement)):
            totals[unit.placement] = totals.get(unit.placement, 0) + unit.size_bytes
        return totals

    @property
    def offloaded(self) -> tuple[PlannedUnit, ...]:
        """Units that run on ``main_device`` but live on the CPU or on disk."""
        return tuple(u for u in self.units if _is_offload(u.placement, self.main_device))

    def __str__(self) -> str:
        return "\n".join(_render(self))

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps({"format": _JSON_FORMAT, **asdict(self)}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> DevicePlan:
        try:
            data = json.loads(text)
            if data.pop("format", None) != _JSON_FORMAT:
                raise ValueError(f"no 'format': {_JSON_FORMAT!r} field")
            units = tuple(PlannedUnit(**u) for u in data.pop("units"))
            return cls(units=units, notes=tuple(data.pop("notes", ())), **data)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise DeviceMapError(f"not a DevicePlan JSON ({err}); write it with to_json()") from err


# --- planning -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Unit:
    name: str
    why: str
    size_bytes: int
    buffer_bytes: int
    whole: bool


@dataclass(frozen=True)
class _Tier:
    placement: str
    budget: int | None  # None: unbounded (disk)
    cap: int | None  # what planning may fill: the budget less the reserve, or a balanced share
    reserve: int


@dataclass(frozen=True)
class _NoSplit:
    classes: frozenset[str]
    fqns: frozenset[str]
    container: str = ""

    def why_whole(self, module: nn.Module, fqn: str) -> str | None:
        name = type(module).__name__
        if name in self.classes:
            return f"no-split unit ({name})"
        if fqn in self.fqns:
            return f"no-split unit (repeated block of {self.container!r})"
        return None


def plan_devices(
    model: nn.Module,
    *,
    max_memory: Mapping[DeviceLike, int | float | str] | None = None,
    strategy: Strategy = "auto",
    no_split_module_classes: Iterable[str | type] | str | type | None = None,
    dtype: DtypeLike | None = None,
    offload_buffers: bool = False,
    headroom_bytes: int | str | None = None,
    keep_in_fp32_modules: Iterable[str] | None = None,
    tensor_sizes: Mapping[str, int] | None = None,
    index: Any = None,
    prefetch: int | None = 0,
) -> DevicePlan:
    """Decide the placement of every parameter and buffer of ``model`` (a meta model is fine).

    Budgets: ``max_memory`` keys ``0``, ``"cuda:0"``, ``torch.device``, ``"cpu"``, ``"mps"``,
    ``"xpu"``, ``"disk"``; values bytes or ``"10GiB"``/``"500MB"``. Only the devices named are
    used, and disk is always allowed, unbounded, as the last resort (as accelerate), unless
    ``"disk": 0`` forbids it; a positive disk value is enforced. ``None``: the free memory of
    each accelerator, ``CPU_FRACTION`` of available RAM, unbounded disk.

    Strategies: ``"auto"`` = ``"balanced"`` (accelerators share the model, as accelerate's
    get_balanced_memory), ``"balanced_low_0"`` (GPU 0 light), ``"sequential"`` (fill in order).
    Tiers are filled in execution order: accelerators → CPU → disk, never going back.

    Units: ``no_split_module_classes`` (names or classes; else ``model._no_split_modules``; else
    the repeated children of the largest ModuleList/Sequential) stay whole; other modules split
    down to leaves, a split module's own tensors being units. ``[]`` splits freely.
    Ties: the tensors of a tie group land on one device with the first unit holding a member.

    Reserve: when anything is offloaded (CPU while accelerators exist, or disk), the main
    execution device (first accelerator, else CPU) keeps room for the largest offloaded unit,
    ``headroom_bytes`` for activations (default: 0 on CPU, ``HEADROOM_FRACTION`` of its budget
    on an accelerator) and, unless ``offload_buffers``, the buffers of offloaded units. With
    ``prefetch`` units fetched ahead (dispatch's depth; ``None``: its default, 1 when the main
    device is an accelerator, 0 on the CPU), the reserve holds the ``1 + prefetch`` largest
    offloaded units: that many are resident on the execution device at once (copies on an
    accelerator; mapped pages on the CPU).
    Sizes: floats at ``dtype`` (fp32 in ``keep_in_fp32_modules``), others at their own dtype;
    ``tensor_sizes`` (fqn → bytes) or a checkpoint ``index`` override the model's shapes.
    """
    _check_strategy(strategy)
    budget_map = budgets(max_memory)
    overrides = {
        **(sizes_from_index(index, dtype) if index is not None else {}),
        **(tensor_sizes or {}),
    }
    entries = measure_tensors(
        model, dtype=dtype, keep_in_fp32_modules=keep_in_fp32_modules, overrides=overrides
    )
    rule, notes = _no_split_rule(model, no_split_module_classes, entries)
    unit_list, bundles = units(model, entries, rule)
    main = _main_device(budget_map)
    headroom = _headroom(headroom_bytes, budget_map, main)
    targets = _targets(strategy, budget_map, unit_list)
    if prefetch is None:  # dispatch's default: one unit ahead onto an accelerator, none on CPU
        prefetch = 1 if main != "cpu" else 0
    rule_ = _ReserveRule(headroom, offload_buffers, 1 + max(0, int(prefetch)))
    placed, reserve = _solve(unit_list, bundles, budget_map, targets, main, rule_)
    _check_main_device(unit_list, placed, budget_map.get(main), main, rule_)
    notes += (f"headroom for activations on {main} when offloading: {format_size(headroom)}",)
    return _to_plan(unit_list, placed, budget_map, main, reserve, strategy, offload_buffers, notes)


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise DeviceMapError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


# --- budgets ------------------------------------------------------------------------------------
def budgets(max_memory: Mapping[DeviceLike, int | float | str] | None) -> dict[str, int | None]:
    """Placement → budget bytes in tier order; ``"disk"`` is ``None`` (unbounded) unless given."""
    parsed = _detected_budgets(CPU_FRACTION) if max_memory is None else parse_max_memory(max_memory)
    result = {placement_str(p): b for p, b in parsed.items()}
    result.setdefault(DISK, None)
    return {p: result[p] for p in sorted(result, key=_tier_key)}


def _detected_budgets(cpu_fraction: float) -> dict[Placement, int]:
    kind = accelerator_type()
    found: dict[Placement, int] = {}
    for i in range(accelerator_count() if kind else 0):
        device = torch.device(kind, i)
        found[device] = free_memory_bytes(device)
    if kind != "mps":  # MPS shares host RAM: a separate CPU budget would count it twice
        found[torch.device("cpu")] = int(cpu_fraction * free_memory_bytes(torch.device("cpu")))
    return found


def _tier_key(placement: str) -> tuple[int, str, int]:
    if placement == DISK:
        return (2, "", 0)
    device = torch.device(placement)
    if device.type == "cpu":
        return (1, "", 0)
    return (0, device.type, device.index or 0)


def _accelerators(budget_map: Mapping[str, int | None]) -> list[str]:
    return [p for p, b in budget_map.items() if p not in ("cpu", DISK) and b]


def _main_device(budget_map: Mapping[str, int | None]) -> str:
    return next(iter(_accelerators(budget_map)), "cpu")


def _is_offload(placement: str, main: str) -> bool:
    return placement != main and placement in ("cpu", DISK)


def _headroom(
    headroom_bytes: int | str | None, budget_map: Mapping[str, int | None], main: str
) -> int:
    if headroom_bytes is not None:
        return parse_size(headroom_bytes, what="headroom_bytes")
    if main == "cpu":
        return 0
    return int(HEADROOM_FRACTION * (budget_map.get(main) or 0))


def _targets(
    strategy: str, budget_map: Mapping[str, int | None], unit_list: list[_Unit]
) -> dict[str, int]:
    """Balanced shares of the accelerators (as accelerate's get_balanced_memory); the last
    accelerator keeps its whole budget."""
    accels = _accelerators(budget_map)
    if strategy == "sequential" or len(accels) < 2:
        return {}
    low_zero = strategy == "balanced_low_0"
    total = sum(u.size_bytes for u in unit_list)
    share = total // (len(accels) - 1 if low_zero else len(accels)) + _balance_slack(unit_list)
    targets = {p: min(share, budget_map[p]) for p in accels[:-1]}
    if low_zero:
        others = sum(targets.get(p, budget_map[p]) for p in accels[1:])
        targets[accels[0]] = min(budget_map[accels[0]], max(0, total - others))
    return targets


def _balance_slack(unit_list: list[_Unit]) -> int:
    """Extra room per accelerator so that whole units do not spill: 1.25 × the larger of the
    largest no-split unit and the mean unit."""
    sized = [u.size_bytes for u in unit_list if u.size_bytes]
    largest_whole = max((u.size_bytes for u in unit_list if u.whole), default=0)
    mean = sum(sized) // max(len(sized), 1)
    return int(1.25 * max(largest_whole, mean))


def _tiers(
    budget_map: Mapping[str, int | None], targets: Mapping[str, int], main: str, reserve: int
) -> list[_Tier]:
    tiers = []
    for placement, budget in budget_map.items():
        if budget == 0:
            continue
        kept = reserve if placement == main else 0
        cap = None if budget is None else max(0, budget - kept)
        if placement in targets:
            cap = min(cap, targets[placement])
        tiers.append(_Tier(placement, budget, cap, kept))
    return tiers


# --- units --------------------------------------------------------------------------------------
def _no_split_rule(
    model: nn.Module, classes: Any, entries: list[TensorSize]
) -> tuple[_NoSplit, tuple[str, ...]]:
    """Units kept whole: the given classes, else the model's ``_no_split_modules``, else the
    repeated blocks of its largest ModuleList/Sequential."""
    declared = getattr(model, "_no_split_modules", None) or None
    if classes is None and declared is None:
        return _repeated_blocks(model, entries)
    names = _class_names(declared if classes is None else classes)
    present = {type(m).__name__ for m in model.modules()}
    for name in sorted(names - present) if classes is not None else ():
        logger.warning(
            "no_split_module_classes: %s matches no module of %s", name, type(model).__name__
        )
    shown = ", ".join(sorted(names)) or "none (split freely)"
    source = "" if classes is not None else f" (declared by {type(model).__name__})"
    return _NoSplit(frozenset(names), frozenset()), (f"no-split classes{source}: {shown}",)


def _class_names(classes: Any) -> frozenset[str]:
    if isinstance(classes, (str, type)):
        classes = [classes]
    return frozenset(c if isinstance(c, str) else c.__name__ for c in classes)


def _repeated_blocks(
    model: nn.Module, entries: list[TensorSize]
) -> tuple[_NoSplit, tuple[str, ...]]:
    """Keep whole the children of the largest ModuleList/Sequential (by bytes)."""
    sizes = module_sizes(entries)
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m._modules) > 1 and sizes.get(name)
    ]
    if not lists:
        return _NoSplit(frozenset(), frozenset()), (
            "no repeated blocks found: split down to leaves",
        )
    name, container = max(lists, key=lambda item: sizes.get(item[0], 0))
    dot = f"{name}." if name else ""
    fqns = frozenset(dot + child for child in container._modules)
    note = (
        f"kept whole: the {len(fqns)} children of {name or '<root>'!r} ({type(container).__name__})"
    )
    logger.info("%s; pass no_split_module_classes to choose other units", note)
    return _NoSplit(frozenset(), fqns, name), (note,)


def units(
    model: nn.Module, entries: list[TensorSize], rule: _NoSplit
) -> tuple[list[_Unit], list[list[int]]]:
    """Units in execution order, and bundles of unit indices that share a tensor (ties)."""
    position = {fqn: i for i, entry in enumerate(entries) for fqn in entry.fqns}
    seen: set[int] = set()
    unit_list, members = [], []
    for name, why, module in _walk(model, "", rule):
        held = list(dict.fromkeys(_held(name, module, position)))
        new = [i for i in held if i not in seen]
        seen.update(new)
        size = sum(entries[i].size_bytes for i in new)
        buffers = sum(entries[i].size_bytes for i in new if entries[i].kind == "buffer")
        unit_list.append(_Unit(name, why, size, buffers, why.startswith("no-split")))
        members.append(held)
    return unit_list, _bundles(members)


def _walk(
    module: nn.Module, prefix: str, rule: _NoSplit
) -> Iterator[tuple[str, str, nn.Module | None]]:
    """(fqn, why, module or None for a tensor) of each unit under ``module``, in registration
    order (a split module's own tensors first)."""
    why = rule.why_whole(module, prefix)
    children = [(n, m) for n, m in module._modules.items() if m is not None]
    if why is not None or not children:
        yield prefix, why or ("leaf module" if prefix else "whole model"), module
        return
    dot = f"{prefix}." if prefix else ""
    owner = f"tensor of split module {prefix!r}" if prefix else "tensor of the root module"
    for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
        if tensor is not None:
            yield dot + name, owner, None
    for name, child in children:
        yield from _walk(child, dot + name, rule)


def _held(name: str, module: nn.Module | None, position: Mapping[str, int]) -> Iterator[int]:
    if module is None:
        yield position[name]
        return
    dot = f"{name}." if name else ""
    for fqn, _tensor, _kind in named_tensors(module):
        yield position[dot + fqn]


def _bundles(members: list[list[int]]) -> list[list[int]]:
    """Group units that hold the same tensor; each bundle is led by its first unit."""
    parent = list(range(len(members)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_holder: dict[int, int] = {}
    for unit, held in enumerate(members):
        for tensor in held:
            other = root(first_holder.setdefault(tensor, unit))
            parent[max(other, root(unit))] = min(other, root(unit))
    groups: dict[int, list[int]] = {}
    for unit in range(len(members)):
        groups.setdefault(root(unit), []).append(unit)
    return list(groups.values())


# --- assignment ---------------------------------------------------------------------------------
def assign(
    unit_list: list[_Unit], bundles: list[list[int]], tiers: list[_Tier]
) -> list[tuple[str, str]]:
    """(placement, why there) per unit: bundles in order, tiers filled in order, never back."""
    placed: list[tuple[str, str]] = [("", "")] * len(unit_list)
    used = [0] * len(tiers)
    at, where = 0, "first device with room"
    for k, bundle in enumerate(bundles):
        size = sum(unit_list[i].size_bytes for i in bundle)
        start = at
        while at < len(tiers) and not _fits(tiers[at], used[at], size):
            at += 1
        if at == len(tiers):
            raise _does_not_fit(unit_list, bundles[k:], tiers[start:], used[start:])
        if at != start:
            where = "; ".join(_skip_reason(tiers[t], used[t], size) for t in range(start, at))
        used[at] += size
        _record(placed, unit_list, bundle, tiers[at].placement, where)
    return placed


def _fits(tier: _Tier, used: int, size: int) -> bool:
    return tier.cap is None or used + size <= tier.cap


def _skip_reason(tier: _Tier, used: int, size: int) -> str:
    free = format_size(max(0, (tier.budget or 0) - used))
    if tier.budget is not None and used + size > tier.budget:
        return f"{tier.placement} full ({free} free)"
    if tier.reserve and used + size > tier.budget - tier.reserve:
        return f"{tier.placement} keeps a {format_size(tier.reserve)} reserve for offloaded units"
    return f"{tier.placement} has its balanced share ({format_size(tier.cap)})"


def _record(
    placed: list[tuple[str, str]],
    unit_list: list[_Unit],
    bundle: list[int],
    placement: str,
    where: str,
) -> None:
    leader = unit_list[bundle[0]].name
    partners = [unit_list[i].name for i in bundle[1:]]
    tie = f"; tie group with {partners}" if partners else ""
    placed[bundle[0]] = (placement, where + tie)
    for i in bundle[1:]:
        placed[i] = (placement, f"tie group: placed with {leader!r}")


def _does_not_fit(
    unit_list: list[_Unit], rest: list[list[int]], tiers: list[_Tier], used: list[int]
) -> DoesNotFitError:
    size = sum(unit_list[i].size_bytes for i in rest[0])
    need = sum(unit_list[i].size_bytes for bundle in rest for i in bundle)
    free = [max(0, t.cap - u) for t, u in zip(tiers, used)]
    shortfall = max(need - sum(free), size - max(free, default=0))
    unit = unit_list[rest[0][0]]
    lines = [
        f"{t.placement}: {format_size(f)} free of {format_size(t.budget)}"
        + (f" (reserve {format_size(t.reserve)})" if t.reserve else "")
        for t, f in zip(tiers, free)
    ]
    return DoesNotFitError(
        f"the model does not fit: unit {unit.name or '<whole model>'!r} ({unit.why}, "
        f"{size} bytes) fits on no device left, and {need} bytes remain to place; "
        f"short by {shortfall} bytes ({format_size(shortfall)}).\n"
        + format_problems(lines or ["no device has a budget"])
        + "\n"
        + _advice(unit, disk_allowed=any(t.placement == DISK for t in tiers))
    )


def _advice(unit: _Unit, *, disk_allowed: bool) -> str:
    steps = ["raise max_memory", "load in a smaller dtype"]
    if not disk_allowed:
        steps.insert(1, 'allow disk offload (drop "disk": 0)')
    if unit.whole:
        steps.append(f"let {unit.name or 'the model'!r} split (no_split_module_classes)")
    return "To fix: " + ", ".join(steps) + "."


@dataclass(frozen=True)
class _ReserveRule:
    """What the main execution device keeps free when units are offloaded to it."""

    headroom: int
    offload_buffers: bool
    resident_units: int  # the unit that runs plus those prefetched ahead

    def need(self, offloaded: list[_Unit]) -> int:
        if not offloaded:
            return 0
        largest = sorted((u.size_bytes for u in offloaded), reverse=True)
        buffers = 0 if self.offload_buffers else sum(u.buffer_bytes for u in offloaded)
        return self.headroom + sum(largest[: self.resident_units]) + buffers


def _solve(
    unit_list: list[_Unit],
    bundles: list[list[int]],
    budget_map: Mapping[str, int | None],
    targets: Mapping[str, int],
    main: str,
    rule: _ReserveRule,
) -> tuple[list[tuple[str, str]], int]:
    """Assign, then grow the main device's reserve until it covers what the plan offloads.

    The reserve only grows (a larger reserve offloads more), so this settles in a few rounds;
    past ``_MAX_ROUNDS`` it takes the bound that covers any unit.
    """
    reserve = 0
    for _ in range(_MAX_ROUNDS):
        placed = assign(unit_list, bundles, _tiers(budget_map, targets, main, reserve))
        need = _reserve_needed(unit_list, placed, main, rule)
        if need <= reserve:
            return placed, reserve
        reserve = need
    reserve = rule.need(unit_list)
    return assign(unit_list, bundles, _tiers(budget_map, targets, main, reserve)), reserve


def _offloaded(unit_list: list[_Unit], placed: list[tuple[str, str]], main: str) -> list[_Unit]:
    return [u for u, (p, _) in zip(unit_list, placed) if _is_offload(p, main)]


def _reserve_needed(
    unit_list: list[_Unit], placed: list[tuple[str, str]], main: str, rule: _ReserveRule
) -> int:
    return rule.need(_offloaded(unit_list, placed, main))


def _check_main_device(
    unit_list: list[_Unit],
    placed: list[tuple[str, str]],
    budget: int | None,
    main: str,
    rule: _ReserveRule,
) -> None:
    """Offloaded units run on the main device: it must hold the largest of them at least."""
    need = _reserve_needed(unit_list, placed, main, rule)
    if budget is None or need <= budget:
        return
    offloaded = _offloaded(unit_list, placed, main)
    largest = max(offloaded, key=lambda u: u.size_bytes)
    headroom, offload_buffers = rule.headroom, rule.offload_buffers
    buffers = 0 if offload_buffers else sum(u.buffer_bytes for u in offloaded)
    raise DoesNotFitError(
        f"the main execution device {main} ({budget} bytes) cannot run the offloaded units: "
        f"they need {need} bytes there (largest offloaded unit {largest.name or '<whole model>'!r}"
        f" {largest.size_bytes} bytes, {rule.resident_units} unit(s) resident with prefetch, "
        f"headroom {headroom} bytes"
        + ("" if offload_buffers else f", their buffers {buffers} bytes")
        + f"); short by {need - budget} bytes ({format_size(need - budget)}).\n"
        f"Raise max_memory for {main}, lower headroom_bytes, fetch fewer units ahead "
        "(prefetch=0 or BIGLOAD_PREFETCH=0), pass offload_buffers=True, or let large units "
        "split (no_split_module_classes)."
    )


def _to_plan(
    unit_list: list[_Unit],
    placed: list[tuple[str, str]],
    budget_map: Mapping[str, int | None],
    main: str,
    reserve: int,
    strategy: str,
    offload_buffers: bool,
    notes: tuple[str, ...],
) -> DevicePlan:
    planned = tuple(
        PlannedUnit(u.name, p, u.size_bytes, f"{u.why}; {where}")
        for u, (p, where) in zip(unit_list, placed)
    )
    # one unit for a model that runs where it lives; offloaded units stay apart (paged one by one)
    if len({u.placement for u in planned}) == 1 and not _is_offload(planned[0].placement, main):
        total = sum(u.size_bytes for u in planned)
        planned = (PlannedUnit("", planned[0].placement, total, f"whole model; {placed[0][1]}"),)
    return DevicePlan(
        units=planned,
        budgets={p: b for p, b in budget_map.items() if b is not None},
        main_device=main,
        reserve_bytes=reserve,
        strategy=strategy,
        offload_buffers=offload_buffers,
        notes=notes,
    )


# --- the table a person reads -------------------------------------------------------------------
def runs(plan_units: Iterable[PlannedUnit]) -> list[list[PlannedUnit]]:
    """Consecutive units on the same placement."""
    result: list[list[PlannedUnit]] = []
    for unit in plan_units:
        if result and result[-1][0].placement == unit.placement:
            result[-1].append(unit)
        else:
            result.append([unit])
    return result


def _render(plan: DevicePlan) -> Iterator[str]:
    yield (
        f"DevicePlan: {len(plan.units)} units, strategy {plan.strategy}, main execution device "
        f"{plan.main_device}, reserve {format_size(plan.reserve_bytes)}"
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
    yield "| device | planned | reserve | budget |"
    yield "|---|---:|---:|---:|"
    for placement in sorted({*used, *plan.budgets}, key=_tier_key):
        budget = plan.budgets.get(placement)
        reserve = plan.reserve_bytes if placement == plan.main_device else 0
        shown = "unbounded" if budget is None else format_size(budget)
        planned = format_size(used.get(placement, 0))
        yield f"| {placement} | {planned} | {format_size(reserve)} | {shown} |"


def _render_disk(plan: DevicePlan) -> Iterator[str]:
    on_disk = [u for u in plan.units if u.placement == DISK]
    if on_disk:
        yield ""
        yield f"to disk: {len(on_disk)} units, {format_size(sum(u.size_bytes for u in on_disk))}"
        yield format_problems(
            [f"{u.name or '<whole model>'}  {format_size(u.size_bytes)}" for u in on_disk]
        )


def _render_decisions(plan: DevicePlan) -> Iterator[str]:
    starts = [run[0] for run in runs(plan.units)]
    ties = [u for u in plan.units if "tie group" in u.reason and u not in starts]
    yield ""
    yield "decisions:"
    lines = [f"{u.name or '<whole model>'} → {u.placement}: {u.reason}" for u in [*starts, *ties]]
    yield format_problems(lines, limit=20)


# --- accelerate-compatible names ----------------------------------------------------------------
def _accelerate_key(placement: str) -> int | str:
    if placement in ("cpu", DISK):
        return placement
    device = torch.device(placement)
    return "mps" if device.type == "mps" else device.index


def get_max_memory(
    max_memory: Mapping[DeviceLike, int | str] | None = None,
) -> dict[int | str, int]:
    """accelerate's: free memory per accelerator (int keys) and available RAM ("cpu"), or the
    given budgets in bytes, ordered accelerators → "mps" → "cpu" → "disk"."""
    parsed = _detected_budgets(1.0) if max_memory is None else parse_max_memory(max_memory)
    ordered = sorted(parsed.items(), key=lambda item: _tier_key(placement_str(item[0])))
    return {_accelerate_key(placement_str(p)): b for p, b in ordered}


def get_balanced_memory(
    model: nn.Module,
    max_memory: Mapping[DeviceLike, int | str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    low_zero: bool = False,
) -> dict[int | str, int]:
    """accelerate's: a ``max_memory`` whose accelerators (all but the last) share the model."""
    budget_map = {p: b for p, b in budgets(get_max_memory(max_memory)).items() if b is not None}
    entries = measure_tensors(model, dtype=dtype, special_dtypes=special_dtypes)
    rule, _notes = _no_split_rule(model, no_split_module_classes, entries)
    unit_list, _ = units(model, entries, rule)
    targets = _targets("balanced_low_0" if low_zero else "balanced", budget_map, unit_list)
    accels = _accelerators(budget_map)
    if max_memory is None and len(accels) == 1:  # as accelerate: keep 10% of a lone GPU free
        targets[accels[0]] = int(0.9 * budget_map[accels[0]])
    return {_accelerate_key(p): targets.get(p, b) for p, b in budget_map.items()}


def infer_auto_device_map(
    model: nn.Module,
    max_memory: Mapping[DeviceLike, int | str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
) -> dict[str, int | str]:
    """accelerate's: {fqn: int (accelerator index) | "mps" | "cpu" | "disk"}, filled in order."""
    overrides = None
    if special_dtypes:
        entries = measure_tensors(model, dtype=dtype, special_dtypes=special_dtypes)
        overrides = {e.fqns[0]: e.size_bytes for e in entries}
    plan = plan_devices(
        model,
        max_memory=get_max_memory(max_memory),
        strategy="sequential",
        no_split_module_classes=no_split_module_classes,
        dtype=dtype,
        offload_buffers=offload_buffers,
        headroom_bytes=0,
        tensor_sizes=overrides,
    )
    if verbose:
        logger.info("%s", plan)
    result = {u.name: _accelerate_key(u.placement) for u in plan.units}
    return clean_device_map(result) if clean_result else result


def clean_device_map(device_map: dict[str, Any], module_name: str = "") -> dict[str, Any]:
    """Merge the keys under each module that all map to one device into the module's key.

    Changes ``device_map`` in place (and returns it), as accelerate's does.
    """
    prefix = f"{module_name}." if module_name else ""
    inside = [(k, v) for k, v in device_map.items() if k == module_name or k.startswith(prefix)]
    merged = iter(_merge(inside, module_name))
    rebuilt: dict[str, Any] = {}
    for key, value in list(device_map.items()):
        if key == module_name or key.startswith(prefix):
            rebuilt.update(merged)
        else:
            rebuilt[key] = value
    device_map.clear()
    device_map.update(rebuilt)
    return device_map


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


def check_device_map(model: nn.Module, device_map: Mapping[str, Any]) -> None:
    """Raise DeviceMapError naming every tensor the map gives no device or a bad value."""
    bad = []
    for key, value in device_map.items():
        try:
            parse_placement(value, check_available=False)
        except ValueError as err:
            bad.append(f"{key!r}: {err}")
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    fqns = [fqn for fqn, _t, _k in named_tensors(model)]
    known = names.union(fqns)
    unknown = [k for k in device_map if k not in known]
    if unknown:
        warnings.warn(f"device_map keys that match nothing in the model: {unknown}", stacklevel=2)
    missing = [
        f"{fqn!r} has no device" for fqn in fqns if covering_entry(device_map, fqn) is None
    ]
    if bad or missing:
        raise DeviceMapError(
            f"the device map does not place every tensor of {type(model).__name__} "
            f"({len(missing)} without a device, {len(bad)} bad values):\n"
            + format_problems(bad + missing)
            + '\nAdd a key for each (a module fqn covers its tensors; "" covers all), '
            "or plan one with plan_devices()."
        )
