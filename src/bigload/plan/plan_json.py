"""Reading a DevicePlan back from JSON: every field checked for type and range, so a hand-edited
or foreign file is a DeviceMapError naming the field, never a TypeError deep inside a stage."""

from __future__ import annotations

import json
from typing import Any

from ..devices import DISK, parse_placement, placement_str
from ..errors import BigloadError, DeviceMapError
from .placements import FROM_MAP, JSON_FORMAT, STRATEGIES

MAX_JSON_BYTES = 256 << 20
_UNIT_FIELDS = {"name": str, "placement": str, "size_bytes": int, "reason": str, "whole": bool,
                "tied_to": (str, type(None)), "hook_at": (str, type(None))}


class _Bad(Exception):
    """One field at fault: where, and what was wrong."""


def parse_plan_json(text: str | bytes) -> dict[str, Any]:
    """The keyword arguments of DevicePlan for ``text`` (units as dicts of PlannedUnit's
    fields); DeviceMapError on anything else."""
    try:
        return _fields(_load(text))
    except _Bad as err:
        raise DeviceMapError(
            f"not a DevicePlan JSON: {err}. Write plans with DevicePlan.to_json() "
            "(or `bigload plan --json`)."
        ) from None


def _load(text: str | bytes) -> dict[str, Any]:
    if not isinstance(text, (str, bytes, bytearray)):
        raise _Bad(f"expected JSON text, got {type(text).__name__}")
    if len(text) > MAX_JSON_BYTES:
        raise _Bad(f"{len(text)} bytes is more than a plan can be ({MAX_JSON_BYTES})")
    try:
        data = json.loads(text)
    except RecursionError:
        raise _Bad("nested too deeply") from None
    except ValueError as err:
        raise _Bad(f"invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise _Bad(f"the top level is a {type(data).__name__}, not an object")
    if data.get("format") != JSON_FORMAT:
        raise _Bad(f"'format' is {data.get('format')!r}, expected {JSON_FORMAT!r}")
    return data


def _fields(data: dict[str, Any]) -> dict[str, Any]:
    known = {"format", "units", "budgets", "main_device", "reserve_bytes", "strategy",
             "offload_buffers", "prefetch", "tie_groups", "tensor_placements", "budget_sources",
             "notes"}
    extra = sorted(set(data) - known)
    if extra:
        raise _Bad(f"unknown field(s) {extra}")
    strategy = _get(data, "strategy", str)
    if strategy not in (*STRATEGIES, FROM_MAP):
        raise _Bad(f"'strategy' is {strategy!r}; one of {[*STRATEGIES, FROM_MAP]}")
    return {
        "units": tuple(_unit(u, i) for i, u in enumerate(_get(data, "units", list))),
        "budgets": {_placement(k, "budgets"): _size(v, f"budgets[{k!r}]")
                    for k, v in _get(data, "budgets", dict).items()},
        "main_device": _device(_get(data, "main_device", str)),
        "reserve_bytes": _size(_get(data, "reserve_bytes", int), "reserve_bytes"),
        "strategy": strategy,
        "offload_buffers": _get(data, "offload_buffers", bool),
        "prefetch": _size(_get(data, "prefetch", int), "prefetch"),
        "tie_groups": tuple(_strings(g, f"tie_groups[{i}]")
                            for i, g in enumerate(_get(data, "tie_groups", list))),
        "tensor_placements": {
            _text(k, "tensor_placements"): _placement(v, f"tensor_placements[{k!r}]")
            for k, v in _get(data, "tensor_placements", dict).items()},
        "budget_sources": {_placement(k, "budget_sources"): _text(v, f"budget_sources[{k!r}]")
                           for k, v in _get(data, "budget_sources", dict).items()},
        "notes": _strings(_get(data, "notes", list), "notes"),
    }


def _get(data: dict[str, Any], key: str, kind: type) -> Any:
    if key not in data:
        raise _Bad(f"field {key!r} is missing")
    value = data[key]
    if not _is(value, kind):
        raise _Bad(f"{key!r} is a {type(value).__name__}, expected {kind.__name__}")
    return value


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool) and kind is int:
        return False
    return isinstance(value, kind)


def _unit(raw: Any, i: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _Bad(f"units[{i}] is a {type(raw).__name__}, not an object")
    if set(raw) != set(_UNIT_FIELDS):
        raise _Bad(f"units[{i}] has fields {sorted(raw)}; expected {sorted(_UNIT_FIELDS)}")
    for key, kind in _UNIT_FIELDS.items():
        if not _is(raw[key], kind):
            raise _Bad(f"units[{i}].{key} is {raw[key]!r}")
    _size(raw["size_bytes"], f"units[{i}].size_bytes")
    return {**raw, "placement": _placement(raw["placement"], f"units[{i}]")}


def _placement(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{where}: {value!r} is not a placement")
    try:
        return placement_str(parse_placement(value, check_available=False))
    except BigloadError as err:
        raise _Bad(f"{where}: {err}") from None


def _device(value: str) -> str:
    placement = _placement(value, "main_device")
    if placement == DISK:
        raise _Bad("main_device cannot be 'disk'")
    return placement


def _size(value: Any, where: str) -> int:
    if not _is(value, int) or value < 0:
        raise _Bad(f"{where} is {value!r}, not a non-negative integer")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{where} is {value!r}, not text")
    return value


def _strings(values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, list):
        raise _Bad(f"{where} is a {type(values).__name__}, not a list")
    return tuple(_text(v, f"{where}[{i}]") for i, v in enumerate(values))
