"""Reading a DevicePlan back from JSON: every field checked for type and range, so a hand-edited
or foreign file is a DeviceMapError naming the field, never a TypeError deep inside a stage."""

from __future__ import annotations

import json
from typing import Any

from ..devices import DISK, parse_placement, placement_str
from ..errors import BigloadError, DeviceMapError
from .placements import EVERY_RANK, FROM_MAP, READABLE_FORMATS, STRATEGIES

MAX_JSON_BYTES = 256 << 20
_UNIT_FIELDS = {"name": str, "placement": str, "size_bytes": int, "reason": str, "whole": bool,
                "tied_to": (str, type(None)), "hook_at": (str, type(None)), "rank": int,
                "extra_bytes": int}
_OPTIONAL_UNIT_FIELDS = {"rank": 0, "extra_bytes": 0}  # absent in format /2
_RANK_FIELDS = {"main_device": str, "budgets": dict, "budget_sources": dict,
                "reserve_bytes": int, "prefetch": int}


class _Bad(Exception):
    """One field at fault: where, and what was wrong."""


def parse_plan_json(text: str | bytes) -> dict[str, Any]:
    """The keyword arguments of DevicePlan for ``text`` (units as dicts of PlannedUnit's
    fields, ranks as dicts of RankSpec's); DeviceMapError on anything else."""
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
    if data.get("format") not in READABLE_FORMATS:
        raise _Bad(f"'format' is {data.get('format')!r}, expected one of {list(READABLE_FORMATS)}")
    return data


def _fields(data: dict[str, Any]) -> dict[str, Any]:
    known = {"format", "units", "budgets", "main_device", "reserve_bytes", "strategy",
             "offload_buffers", "prefetch", "tie_groups", "tensor_placements", "budget_sources",
             "notes", "world_size", "rank", "ranks"}
    extra = sorted(set(data) - known)
    if extra:
        raise _Bad(f"unknown field(s) {extra}")
    strategy = _get(data, "strategy", str)
    if strategy not in (*STRATEGIES, FROM_MAP):
        raise _Bad(f"'strategy' is {strategy!r}; one of {[*STRATEGIES, FROM_MAP]}")
    world = _world(data)
    ranks = tuple(_rank_spec(r, i) for i, r in enumerate(_list(data.get("ranks", []), "ranks")))
    if world > 1 and len(ranks) != world:
        raise _Bad(f"'ranks' has {len(ranks)} entries for world_size {world}")
    units = tuple(_unit(u, i) for i, u in enumerate(_get(data, "units", list)))
    bad = [u["name"] for u in units if not (0 <= u["rank"] < world or u["rank"] == EVERY_RANK)]
    if bad:
        raise _Bad(f"unit {bad[0]!r} names a rank outside world_size {world}")
    rank = data.get("rank", 0)
    if not _is(rank, int) or not 0 <= rank < world:
        raise _Bad(f"'rank' is {rank!r}, not a rank of world_size {world}")
    return {
        "world_size": world, "rank": rank, "ranks": ranks, "units": units,
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


def _world(data: dict[str, Any]) -> int:
    world = data.get("world_size", 1)
    if not _is(world, int) or world < 1:
        raise _Bad(f"'world_size' is {world!r}, not a positive integer")
    return world


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise _Bad(f"{where!r} is a {type(value).__name__}, expected list")
    return value


def _rank_spec(raw: Any, i: int) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) != set(_RANK_FIELDS):
        raise _Bad(f"ranks[{i}] is not an object with fields {sorted(_RANK_FIELDS)}")
    for key, kind in _RANK_FIELDS.items():
        if not _is(raw[key], kind):
            raise _Bad(f"ranks[{i}].{key} is {raw[key]!r}")
    return {
        "main_device": _device(raw["main_device"]),
        "budgets": {_placement(k, f"ranks[{i}].budgets"): _size(v, f"ranks[{i}].budgets[{k!r}]")
                    for k, v in raw["budgets"].items()},
        "budget_sources": {_placement(k, f"ranks[{i}].budget_sources"): _text(v, "budget_sources")
                           for k, v in raw["budget_sources"].items()},
        "reserve_bytes": _size(raw["reserve_bytes"], f"ranks[{i}].reserve_bytes"),
        "prefetch": _size(raw["prefetch"], f"ranks[{i}].prefetch")}


def _unit(raw: Any, i: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _Bad(f"units[{i}] is a {type(raw).__name__}, not an object")
    raw = {**_OPTIONAL_UNIT_FIELDS, **raw}
    if set(raw) != set(_UNIT_FIELDS):
        raise _Bad(f"units[{i}] has fields {sorted(raw)}; expected {sorted(_UNIT_FIELDS)}")
    for key, kind in _UNIT_FIELDS.items():
        if not _is(raw[key], kind):
            raise _Bad(f"units[{i}].{key} is {raw[key]!r}")
    _size(raw["size_bytes"], f"units[{i}].size_bytes")
    _size(raw["extra_bytes"], f"units[{i}].extra_bytes")
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
