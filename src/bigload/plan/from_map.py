"""A device map the user wrote (``{module: device}``, one device, ``"disk"``) becomes a DevicePlan
once, here: its coverage checked, offloaded entries split into the blocks they page in by, ties
resolved, the main device and prefetch depth decided."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, Literal

from torch import nn

from ..devicemap import DeviceMap, covering_entry, normalize_device_map
from ..devices import DISK, DeviceLike, is_accelerator, parse_device, placement_str
from ..errors import DeviceMapError, format_problems
from ..sizes import DtypeLike, tensor_sizes
from ..slots import TensorSlot, iter_slots, names_something, tensor_groups
from .placements import FROM_MAP
from .types import DevicePlan, PlannedUnit, check_prefetch, default_prefetch
from .types import main_device_for as choose_main
from .units import class_names

logger = logging.getLogger(__name__)


def plan_from_device_map(
    model: nn.Module,
    device_map: Any,
    *,
    main_device: DeviceLike | None = None,
    prefetch: int | None = None,
    no_split_module_classes: Iterable[str | type] | None = None,
    preload_module_classes: Iterable[str | type] | None = None,
    dtype: DtypeLike | None = None,
    offload_buffers: bool = False,
    check_available: bool = True,
) -> DevicePlan:
    """The plan of a device map given by hand: ``"cpu"``, ``0``, ``torch.device``, ``"disk"``,
    or ``{fqn prefix: placement}`` covering every persistent tensor of ``model``.

    Offloaded entries (disk, or CPU while the main device is an accelerator) are split into
    units that page in one at a time: modules of ``no_split_module_classes`` (default: the
    model's ``_no_split_modules``) and ``preload_module_classes`` stay whole, others split down
    to the modules that hold tensors. ``main_device`` runs the offloaded units (default: the
    first accelerator of the map, else the CPU); ``prefetch`` as in :func:`plan_devices`.
    The buffers of offloaded units stay on the main device unless ``offload_buffers``.
    """
    dmap = normalize_device_map(device_map, check_available=check_available)
    check_covers(model, dmap)
    main = choose_main([placement_str(p) for p in dmap.values() if is_accelerator(p)],
                       None if main_device is None else str(parse_device(
                           main_device, check_available=check_available)))
    keep_whole = class_names(no_split_module_classes if no_split_module_classes is not None
                             else getattr(model, "_no_split_modules", None) or ())
    keep_whole |= class_names(preload_module_classes or (), "preload_module_classes")
    pieces = _pieces(model, dmap, main, keep_whole)
    groups = tensor_groups(iter_slots(model))
    ties = tuple(tuple(s.fqn for s in g) for g in groups if len(g) > 1 and g[0].persistent)
    preload = class_names(preload_module_classes or (), "preload_module_classes")
    units = tuple(replace(u, hook_at=preloading_ancestor(model, u.name, preload))
                  for u in _units(model, pieces, groups, dtype))
    return DevicePlan(
        units=units, budgets={}, main_device=main,
        strategy=FROM_MAP, tie_groups=ties, offload_buffers=offload_buffers,
        prefetch=default_prefetch(main) if prefetch is None else check_prefetch(prefetch),
        tensor_placements={} if offload_buffers else _resident_buffers(model, units, main),
    )


def _resident_buffers(
    model: nn.Module, units: tuple[PlannedUnit, ...], main: str
) -> dict[str, str]:
    by_name = {u.name: u.placement for u in units}
    placed = ((s.fqn, covering_entry(by_name, s.fqn)) for s in iter_slots(model) if not s.is_param)
    return {fqn: main for fqn, hit in placed
            if hit is not None and (hit[1] == DISK or (hit[1] == "cpu" and main != "cpu"))}


def check_covers(
    model: nn.Module, keys: Mapping[str, Any], *, unknown: Literal["error", "warn"] = "error",
) -> None:
    """Every persistent tensor of ``model`` under a key of ``keys`` (``""`` covers all), and
    every key a module or tensor of the model: one DeviceMapError listing what is not."""
    strays = [k for k in keys if k and not names_something(model, k)]
    uncovered = [s.fqn for s in iter_slots(model)
                 if s.persistent and covering_entry(keys, s.fqn) is None]
    problems = [f"{n!r} has no device" for n in uncovered]
    stray_lines = [f"{k!r} names no module or tensor of {type(model).__name__}" for k in strays]
    if unknown == "warn" and stray_lines:
        warnings.warn("device_map keys do not match any submodules (they name nothing in the "
                      "model): " + ", ".join(repr(k) for k in strays), stacklevel=3)
    elif stray_lines:
        problems = stray_lines + problems
    if problems:
        raise DeviceMapError(
            f"the device map does not fit {type(model).__name__} ({len(uncovered)} tensor(s) "
            f"without a device):\n" + format_problems(problems)
            + "\nUse module names from model.named_modules() ('' for the whole model) and give "
            "every tensor a device, or plan one with plan_devices()."
        )


def preloading_ancestor(model: nn.Module, name: str, preload: frozenset[str]) -> str | None:
    """The outermost module strictly enclosing unit ``name`` whose class is in ``preload``
    (its forward reads the unit's weights directly), or None."""
    parts = name.split(".") if name else []
    for depth in range(len(parts)):
        prefix = ".".join(parts[:depth])
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            return None
        if type(module).__name__ in preload:
            return prefix
    return None


def _pieces(
    model: nn.Module, dmap: DeviceMap, main: str, keep_whole: frozenset[str]
) -> list[tuple[str, str, bool]]:
    """(unit name, placement, split?) for each map entry; offloaded entries split into blocks."""
    pieces = []
    for key, placement in dmap.items():
        where = placement_str(placement)
        offloaded = where == DISK or (where == "cpu" and main != "cpu")
        names = _split_key(model, key, keep_whole) if offloaded else [key]
        pieces.extend((name, where, len(names) > 1) for name in names)
    return pieces


def _split_key(model: nn.Module, key: str, keep_whole: frozenset[str]) -> list[str]:
    try:
        module = model.get_submodule(key) if key else model
    except AttributeError:  # a tensor key: one unit
        return [key]
    return list(_split(key, module, keep_whole))


def _split(name: str, module: nn.Module, keep_whole: frozenset[str]) -> Iterable[str]:
    direct = any(t is not None for t in [*module._parameters.values(),
                                         *module._buffers.values()])
    if direct or type(module).__name__ in keep_whole or not module._modules:
        yield name
        return
    for child_name, child in module.named_children():
        yield from _split(f"{name}.{child_name}" if name else child_name, child, keep_whole)


def _units(
    model: nn.Module, pieces: list[tuple[str, str, bool]], groups: list[list[TensorSlot]],
    dtype: DtypeLike | None,
) -> tuple[PlannedUnit, ...]:
    """Units in execution order (of their first tensor), each persistent tensor counted in the
    unit of its first name; entries holding no tensor are dropped."""
    by_name = {name: (where, split) for name, where, split in pieces}
    sizes = {e.fqns[0]: e.size_bytes for e in tensor_sizes(model, dtype=dtype)}
    order: dict[str, int] = {}
    size: dict[str, int] = dict.fromkeys(by_name, 0)
    tied_to: dict[str, str] = {}
    for position, group in enumerate(groups):
        names = tuple(s.fqn for s in group)
        found = (covering_entry(by_name, name) for name in names)
        holders = [hit[0] for hit in found if hit is not None]
        for holder in holders:
            order.setdefault(holder, position)
        if group[0].persistent:  # always covered (check_covers)
            size[holders[0]] += sizes.get(names[0], 0)
            _note_tie(names, holders, by_name, tied_to)
    named = sorted((n for n in by_name if n in order), key=order.__getitem__)
    return tuple(PlannedUnit(n, by_name[n][0], size[n], _reason(by_name[n][1], tied_to.get(n)),
                             tied_to=tied_to.get(n)) for n in named)


def _note_tie(
    group: tuple[str, ...], holders: list[str], by_name: Mapping[str, tuple[str, bool]],
    tied_to: dict[str, str],
) -> None:
    home = by_name[holders[0]][0]
    for fqn, holder in zip(group[1:], holders[1:]):
        if holder == holders[0]:
            continue
        tied_to.setdefault(holder, holders[0])
        if by_name[holder][0] != home:
            logger.warning(
                "tied tensors %s are mapped to %s and %s; a tie is one tensor: it lives on %s "
                "(with %r), and %r uses it from there", list(group), home, by_name[holder][0],
                home, group[0], fqn)


def _reason(split: bool, tied_to: str | None) -> str:
    why = "given by the device map" + ("; split to page in block by block" if split else "")
    return why + (f"; shares a tensor with {tied_to!r}" if tied_to else "")
