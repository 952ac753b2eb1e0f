"""accelerate's budgets and device maps: ``get_max_memory``, ``get_balanced_memory``,
``infer_auto_device_map``, ``clean_device_map``, ``check_device_map`` — integer accelerator keys,
accelerate's defaults, computed by bigload's planner."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ...devicemap import normalize_device_map
from ...devices import DISK, DeviceLike, parse_max_memory
from ...plan import check_covers, merge_prefixes, plan_devices, read_budgets, tier_key
from ...plan.budgets import balanced_targets, detected_budgets
from ...plan.units import no_split_rule, plan_units
from ...sizes import DtypeLike, tensor_sizes

logger = logging.getLogger(__name__)

def _accelerate_key(placement: str) -> int | str:
    if placement in ("cpu", DISK):
        return placement
    device = torch.device(placement)
    return "mps" if device.type == "mps" else device.index  # type: ignore[return-value]


def get_max_memory(
    max_memory: Mapping[DeviceLike, int | str] | None = None,
) -> dict[int | str, int]:
    """accelerate's: free memory per accelerator (int keys) and available RAM ("cpu"), or the
    given budgets in bytes, ordered accelerators → "mps" → "cpu" → "disk"."""
    if max_memory is None:
        found = {p: b for p, b in detected_budgets(1.0)[0].items() if b is not None}
    else:
        found = {str(p) if not isinstance(p, str) else p: b
                 for p, b in parse_max_memory(max_memory).items()}
    ordered = sorted(found.items(), key=lambda item: tier_key(item[0]))
    return {_accelerate_key(p): b for p, b in ordered}


def get_balanced_memory(
    model: nn.Module,
    max_memory: Mapping[DeviceLike, int | str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    low_zero: bool = False,
) -> dict[int | str, int]:
    """accelerate's: a ``max_memory`` whose accelerators (all but the last) share the model."""
    budgets = read_budgets(get_max_memory(max_memory))
    entries = tensor_sizes(model, dtype=dtype, special_dtypes=special_dtypes)
    rule, _notes = no_split_rule(model, no_split_module_classes or [], entries)
    units = plan_units(model, entries, rule)
    largest_whole = max((u.size_bytes for u in units if u.whole), default=0)
    strategy = "balanced_low_0" if low_zero else "balanced"
    targets = balanced_targets(strategy, budgets, [u.size_bytes for u in units], largest_whole)
    accels = budgets.accelerators()
    if max_memory is None and len(accels) == 1:  # as accelerate: keep 10% of a lone GPU free
        targets[accels[0]] = int(0.9 * budgets.limits[accels[0]])  # type: ignore[operator]
    return {_accelerate_key(p): targets.get(p, b)  # type: ignore[misc]
            for p, b in budgets.limits.items() if b is not None}


def infer_auto_device_map(
    model: nn.Module,
    max_memory: Mapping[DeviceLike, int | str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
) -> dict[str, int | str]:
    """accelerate's: {fqn: int (accelerator index) | "mps" | "cpu" | "disk"}, filled in order.

    As accelerate, modules split down to leaves unless ``no_split_module_classes`` names them.
    ``fallback_allocation`` is accepted: bigload's planner already places any unit that fits
    on a device, whatever comes before it."""
    del fallback_allocation
    overrides = None
    if special_dtypes:
        entries = tensor_sizes(model, dtype=dtype, special_dtypes=special_dtypes)
        overrides = {e.fqns[0]: e.size_bytes for e in entries}
    plan = plan_devices(
        model, max_memory=get_max_memory(max_memory), strategy="sequential",
        no_split_module_classes=no_split_module_classes or [], dtype=dtype,
        offload_buffers=offload_buffers, headroom_bytes=0, tensor_sizes=overrides, prefetch=0,
    )
    if verbose:
        logger.info("%s", plan)
    result = {u.name: _accelerate_key(u.placement) for u in plan.units}
    return clean_device_map(result) if clean_result else result


def clean_device_map(device_map: dict[str, Any], module_name: str = "") -> dict[str, Any]:
    """Merge the keys under each module that all map to one device into the module's key.

    Changes ``device_map`` in place (and returns it), as accelerate's does.
    """
    merged = merge_prefixes(device_map, module_name)
    device_map.clear()
    device_map.update(merged)
    return device_map


def check_device_map(model: nn.Module, device_map: Mapping[str, Any]) -> None:
    """Raise DeviceMapError naming every tensor the map gives no device or a bad value; keys
    that match nothing in the model are a warning (as accelerate)."""
    normalize_device_map(dict(device_map), check_available=False)
    check_covers(model, device_map, unknown="warn")


