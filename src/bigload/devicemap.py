"""Device maps as the stages exchange them: ``{module or tensor prefix: placement}``, normalised
once at the edge, and the longest-prefix lookup every stage uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .devices import DISK, DeviceLike, Placement, parse_placement, placement_str
from .errors import DeviceMapError

DeviceMap = dict[str, Placement]


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
    except Exception as err:
        raise DeviceMapError(f"device_map[{key!r}] = {value!r}: {err}") from err


def placement_of(device_map: Mapping[str, Placement], fqn: str) -> Placement | None:
    """The placement of ``fqn``: the entry of its longest prefix (whole dotted components)."""
    name = fqn
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


def single_device(device_map: Mapping[str, Placement]) -> Placement | None:
    """The one placement of a map that sends everything to one place, else None."""
    values = {placement_str(v) for v in device_map.values()}
    if len(values) == 1 and "" in device_map:
        return device_map[""]
    if len(values) == 1 and values != {DISK}:
        return next(iter(device_map.values()))
    return None


def to_json_map(device_map: Mapping[str, Placement]) -> dict[str, str]:
    return {k: placement_str(v) for k, v in device_map.items()}
