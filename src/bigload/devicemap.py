"""Device maps as the stages exchange them: ``{module or tensor prefix: placement}``, normalised
once at the edge, and the longest-prefix lookup every stage uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from .devices import DeviceLike, Placement, parse_placement
from .errors import DeviceError, DeviceMapError

DeviceMap = dict[str, Placement]
V = TypeVar("V")


def normalize_device_map(device_map: Any, *, check_available: bool = True) -> DeviceMap:
    """``"cpu"``, ``0``, ``torch.device``, ``"disk"``, ``{"": ...}`` or a dict of prefixes
    → ``{prefix: placement}`` with parsed placements."""
    if device_map is None:
        return {"": torch.device("cpu")}
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
