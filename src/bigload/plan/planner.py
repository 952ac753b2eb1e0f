"""``plan_devices``: sizes + budgets + rules (no-split units, ties, reserve, prefetch) → a frozen
``DevicePlan``. Disk is the last resort unless ``max_memory`` says ``"disk": 0``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ..devices import DeviceLike, format_size
from ..errors import DeviceMapError, DoesNotFitError
from ..sizes import DtypeLike, sizes_from_index
from ..sizes import tensor_sizes as measure_tensors
from .budgets import Budgets, balanced_targets, headroom, read_budgets
from .placements import STRATEGIES
from .ranks import RankOptions, plan_ranks
from .solve import Placed, ReserveRule, check_main_device, fill, is_offload, offloaded, solve
from .types import DevicePlan, PlannedUnit, check_prefetch, default_prefetch
from .types import main_device_for as choose_main
from .units import NoSplitRule, UnitSpec, class_names, no_split_rule, plan_units

Strategy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
MaxMemory = Mapping[DeviceLike, int | float | str]
Adjust = Callable[[list[UnitSpec]], list[UnitSpec]]


def plan_devices(
    model: nn.Module,
    *,
    max_memory: MaxMemory | Sequence[MaxMemory] | None = None,
    strategy: Strategy = "auto",
    no_split_module_classes: Iterable[str | type] | str | type | None = None,
    dtype: DtypeLike | None = None,
    offload_buffers: bool = False,
    headroom_bytes: int | str | None = None,
    keep_in_fp32_modules: Iterable[str] | None = None,
    tensor_sizes: Mapping[str, int] | None = None,
    index: Any = None,
    prefetch: int | None = None,
    preload_module_classes: Iterable[str | type] | None = None,
    world: int = 1,
    extra_bytes: Mapping[str, int] | None = None,
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
    the repeated children of the largest ModuleList/Sequential) stay whole, and so do modules of
    ``preload_module_classes`` (their forward reads their children's weights); other modules
    split down to leaves, a split module's own tensors being units. ``[]`` splits freely.
    Ties: a shared tensor is counted in the first unit holding it; a later holder joins that
    unit's device when it fits there, else it uses the tensor where the first unit keeps it.

    Reserve: when anything is offloaded (CPU while accelerators exist, or disk), the main
    execution device (first accelerator, else CPU) keeps room for the offloaded units that are
    resident at once — the one running and ``prefetch`` fetched ahead (``None``: one on an
    accelerator, none on the CPU) — plus ``headroom_bytes`` for activations (default: 0 on
    CPU, ``HEADROOM_FRACTION`` of its budget on an accelerator) and, unless
    ``offload_buffers``, the buffers of offloaded units. The plan carries ``prefetch``.
    Sizes: floats at ``dtype`` (fp32 in ``keep_in_fp32_modules``), others at their own dtype;
    ``tensor_sizes`` (fqn → bytes) or a checkpoint ``index`` override the model's shapes.

    Ranks: ``world > 1`` plans over that many torch.distributed ranks: units split into
    contiguous stages balanced by bytes, then each stage on its rank's own tiers as above.
    ``max_memory`` is then one mapping per rank (or one for every rank; None: each rank like
    this machine). ``extra_bytes`` (module fqn → bytes) is what a rank keeps for a module
    besides its weights (its KV cache, the logits of the head): it counts in the balance.
    """
    if strategy not in STRATEGIES:
        raise DeviceMapError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    per_rank = _per_rank(max_memory, world)
    budgets = per_rank[0]
    overrides = {
        **(sizes_from_index(index, dtype) if index is not None else {}),
        **(tensor_sizes or {}),
    }
    entries = measure_tensors(
        model, dtype=dtype, keep_in_fp32_modules=keep_in_fp32_modules, overrides=overrides
    )
    rule, notes = no_split_rule(model, no_split_module_classes, entries)
    if preload_module_classes:
        rule = type(rule)(rule.classes | class_names(preload_module_classes,
                                                     "preload_module_classes"),
                          rule.fqns, rule.container)
    units = plan_units(model, entries, rule)
    if world > 1:
        if preload_module_classes:
            raise DeviceMapError("preload_module_classes is not supported over several ranks")

        def place(stage: list[UnitSpec], budgets: Budgets, targets: Mapping[str, int],
                  main: str, reserve_rule: ReserveRule, adjust: Adjust,
                  ) -> tuple[list[UnitSpec], Placed, tuple[str, ...]]:
            names = frozenset(u.name for u in stage)
            return _Placing(model, entries, rule, budgets, targets, main, adjust(stage), names,
                            adjust).run(reserve_rule)

        return plan_ranks(units, per_rank, place, extra_bytes=extra_bytes, tie_groups=tuple(
            e.fqns for e in entries if len(e.fqns) > 1), notes=notes, options=RankOptions(
                strategy, headroom_bytes, prefetch, offload_buffers))
    main = choose_main(budgets.accelerators())
    room = headroom(headroom_bytes, budgets, main)
    depth = default_prefetch(main) if prefetch is None else check_prefetch(prefetch)
    largest_whole = max((u.size_bytes for u in units if u.whole), default=0)
    targets = balanced_targets(strategy, budgets, [u.size_bytes for u in units], largest_whole)
    placing = _Placing(model, entries, rule, budgets, targets, main, units)
    try:
        units, placed, said = placing.run(ReserveRule(room, offload_buffers, 1 + depth))
    except DoesNotFitError:
        if prefetch is not None or depth == 0:
            raise
        placed = None  # the default read-ahead gives way where the room holds one unit at a time
    if placed is None:
        depth = 0
        units, placed, said = placing.run(ReserveRule(room, offload_buffers, 1))
        said += (f"nothing is read ahead: the room on {main} holds one offloaded unit at a time",)
    reserve = ReserveRule(room, offload_buffers, 1 + depth).need(offloaded(units, placed, main))
    notes += said + (f"headroom for activations on {main} when offloading: {format_size(room)}",)
    return DevicePlan(
        units=_planned(units, placed, main), budgets=_bounded(budgets), main_device=main,
        reserve_bytes=reserve, strategy=strategy, offload_buffers=offload_buffers,
        prefetch=depth, tie_groups=tuple(e.fqns for e in entries if len(e.fqns) > 1),
        tensor_placements={} if offload_buffers else resident_buffers(units, placed, main),
        budget_sources=dict(budgets.sources), notes=notes,
    )


@dataclass(frozen=True)
class _Placing:
    """Units onto tiers for one reserve rule: in order, then the units too big for the room on
    the main device streamed in pieces, then room left filled from disk."""

    model: nn.Module
    entries: list
    rule: NoSplitRule
    budgets: Budgets
    targets: Mapping[str, int]
    main: str
    whole: list[UnitSpec]  # the units before any streams in pieces
    only: frozenset[str] | None = None  # one rank's stage: the names of its units
    adjust: Adjust | None = None  # the units as that rank counts them (extras, duplicates)

    def pieces(self, streamed: frozenset[str]) -> list[UnitSpec]:
        units = plan_units(self.model, self.entries, self.rule, split=streamed)
        if self.only is not None:
            units = [u for u in units if (u.piece_of or u.name) in self.only]
        return self.adjust(units) if self.adjust is not None else units

    def run(self, reserve_rule: ReserveRule) -> tuple[list[UnitSpec], Placed, tuple[str, ...]]:
        budget, said, units = self.budgets.limits.get(self.main), (), self.whole
        placed, _ = solve(units, self.budgets, self.targets, self.main, reserve_rule)
        streamed = _to_stream(self.model, units, placed, budget, self.main, reserve_rule)
        if streamed:
            units = self.pieces(streamed)
            placed, _ = solve(units, self.budgets, self.targets, self.main, reserve_rule)
            said = (f"streamed in pieces (too big for the room on {self.main}): "
                    + ", ".join(sorted(repr(n) for n in streamed)),)
        check_main_device(units, placed, budget, self.main, reserve_rule)
        return units, fill(units, placed, self.budgets, self.targets, self.main,
                           reserve_rule), said


def _per_rank(max_memory: Any, world: int) -> list[Budgets]:
    """One Budgets per rank: a sequence gives each rank its own, a mapping (or None) is the
    same for every rank."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise DeviceMapError(f"world={world!r}: give the number of ranks (an int >= 1)")
    if isinstance(max_memory, Budgets):
        return [max_memory] * world
    if max_memory is None or isinstance(max_memory, Mapping):
        return [read_budgets(max_memory)] * world
    if isinstance(max_memory, (str, bytes)) or not isinstance(max_memory, Sequence):
        raise DeviceMapError(
            f"max_memory={max_memory!r}: give a mapping ({{'cpu': '8GiB'}}) or one per rank")
    if len(max_memory) != world:
        raise DeviceMapError(
            f"max_memory has budgets for {len(max_memory)} rank(s) but world={world}: give one "
            "mapping per rank, or one mapping for every rank")
    return [m if isinstance(m, Budgets) else read_budgets(m) for m in max_memory]


def _to_stream(
    model: nn.Module, units: list[UnitSpec], placed: Placed, budget: int | None, main: str,
    rule: ReserveRule,
) -> frozenset[str]:
    """Offloaded units to stream in pieces, when the main device cannot hold them whole."""
    moved = offloaded(units, placed, main)
    if budget is None or rule.need(moved) <= budget:
        return frozenset()
    return frozenset(u.name for u in moved if u.piece_of is None and _has_pieces(model, u.name))


def _has_pieces(model: nn.Module, name: str) -> bool:
    try:
        module = model.get_submodule(name) if name else model
    except AttributeError:  # a tensor unit
        return False
    return any(True for _ in module.children())


def resident_buffers(units: list[UnitSpec], placed: Placed, main: str) -> dict[str, str]:
    """The buffers of offloaded units, kept on the main device (their reserve counts them)."""
    return {fqn: main for u, (p, _) in zip(units, placed) if is_offload(p, main)
            for fqn in u.buffers}


def _bounded(budgets: Budgets) -> dict[str, int]:
    return {p: b for p, b in budgets.limits.items() if b is not None}


def _planned(units: list[UnitSpec], placed: Placed, main: str) -> tuple[PlannedUnit, ...]:
    planned = tuple(
        PlannedUnit(u.name, p, u.size_bytes, f"{u.why}; {where}", u.whole, u.tied_to)
        for u, (p, where) in zip(units, placed)
    )
    # one unit for a model that runs where it lives; offloaded units stay apart (paged one by one)
    if len({u.placement for u in planned}) == 1 and not is_offload(planned[0].placement, main):
        total = sum(u.size_bytes for u in planned)
        return (PlannedUnit("", planned[0].placement, total, f"whole model; {placed[0][1]}"),)
    return planned
