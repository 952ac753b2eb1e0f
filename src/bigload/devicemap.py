"""Device maps as the stages exchange them: ``{module or tensor prefix: placement}``, normalised
once at the edge, and the longest-prefix lookup every stage uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from .devices import DISK, DeviceLike, Placement, parse_placement, placement_str
from .errors import DeviceError, DeviceMapError

DeviceMap = dict[str, Placement]
V = TypeVar("V")


def normalize_device_map(device_map: Any, *, check_available: bool = True) -> DeviceMap:
    """``"cpu"``, ``0``, ``torch.device``, ``{"": ...}``, a dict of prefixes, or a DevicePlan
    → ``{prefix: placement}`` with parsed placements."""
    if device_map is None:
        return {"": torch.device("cpu")}
    if hasattr(device_map, "device_map") and not isinstance(device_map, Mapping):
        device_map = device_map.device_map  # a DevicePlan
    if isinstance(device_map, (int, str, torch.device)) and not isinstance(device_map, bool):
        return {"": _parse(device_map, "", check_available)}
    if not isinstance(device_map, Mapping):
        raise DeviceMapError(
            f"device_map must be a device, a dict {{module name: device}} or a DevicePlan, "
            f"not {type(device_map).__name__}"
        )
    return {str(k): _parse(v, str(k), check_available) for k, v in device_map.items()}


def _parse(value: DeviceLike, key: str, check_available: bool) -> Placement:
    try:
        return parse_placement(value, check_available=check_available)
    except DeviceError as err:
        raise DeviceMapError(f"device_map[{key!r}] = {value!r}: {err}") from err


def covering_entry(mapping: Mapping[str, V], fqn: str) -> tuple[str, V] | None:
    """The ``(key, value)`` of ``mapping`` whose key is ``fqn``'s longest prefix (whole dotted
    components, ``""`` covering everything), or None."""
    name = fqn
    while True:
        if name in mapping:
            return name, mapping[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


def placement_of(device_map: Mapping[str, Placement], fqn: str) -> Placement | None:
    """The placement of ``fqn``: the entry of its longest prefix."""
    found = covering_entry(device_map, fqn)
    return found[1] if found else None


def single_device(device_map: Mapping[str, Placement]) -> Placement | None:
    """The one placement of a map that sends everything to one place, else None."""
    values = {placement_str(v) for v in device_map.values()}
    if len(values) == 1 and "" in device_map:
        return device_map[""]
    if len(values) == 1 and values != {DISK}:
        return next(iter(device_map.values()))
    return None
