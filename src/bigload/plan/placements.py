"""Placement texts ordered and merged: the tier order (accelerators, the CPU, disk), accelerate-
style prefix maps (keys under a module holding one value merged into the module's key), and the
names the plan's JSON and strategies use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from ..devices import DISK

JSON_FORMAT = "bigload.DevicePlan/3"
READABLE_FORMATS = ("bigload.DevicePlan/2", JSON_FORMAT)  # /2: one rank, no rank fields
EVERY_RANK = -1  # the rank of a unit every rank holds (a tensor of a split module)
STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
FROM_MAP = "device_map"  # the strategy of a plan made from a user's own device map

V = TypeVar("V")


def tier_key(placement: str) -> tuple[int, str, int]:
    """Sort key of placements: accelerators (by type and index), then the CPU, then disk."""
    if placement == DISK:
        return (2, "", 0)
    device = torch.device(placement)
    if device.type == "cpu":
        return (1, "", 0)
    return (0, device.type, device.index or 0)


def merge_prefixes(mapping: Mapping[str, V], module_name: str = "") -> dict[str, V]:
    """``mapping`` (fqn prefix → value) with the keys under each module that all hold one value
    merged into the module's key; the order of first appearance is kept."""
    prefix = f"{module_name}." if module_name else ""
    inside = [(k, v) for k, v in mapping.items() if k == module_name or k.startswith(prefix)]
    merged = iter(_merge(inside, module_name))
    rebuilt: dict[str, Any] = {}
    for key, value in mapping.items():
        if key == module_name or key.startswith(prefix):
            rebuilt.update(merged)
        else:
            rebuilt[key] = value
    return rebuilt


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
