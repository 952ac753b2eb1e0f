"""Tie groups: tensors reachable under several fqns (identity), kept on one device, re-tied.

Groups list their members in registration order; the first member is the one a plan places
first and the one a user-given device map is corrected towards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from .devicemap import covering_entry
from .devices import parse_placement, placement_str
from .sizes import named_tensors

logger = logging.getLogger(__name__)


def tie_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Groups of fqns (parameters and buffers) that share one tensor object, in model order."""
    by_id: dict[int, list[str]] = {}
    for fqn, tensor, _kind in named_tensors(model):
        by_id.setdefault(id(tensor), []).append(fqn)
    return [tuple(fqns) for fqns in by_id.values() if len(fqns) > 1]


def find_tied_parameters(model: nn.Module) -> list[list[str]]:
    """accelerate-compatible: sorted groups of parameter fqns sharing one Parameter."""
    by_id: dict[int, list[str]] = {}
    for fqn, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(fqn)
    return sorted(sorted(fqns) for fqns in by_id.values() if len(fqns) > 1)


def retie_parameters(model: nn.Module, tied_params: Iterable[Sequence[str]]) -> None:
    """Make every fqn of each group point at one Parameter again (the first that is not meta)."""
    for group in tied_params:
        params = [model.get_parameter(fqn) for fqn in group]
        keep = next((p for p in params if p.device.type != "meta"), None)
        if keep is None:
            continue
        for fqn in group:
            owner, _, name = fqn.rpartition(".")
            setattr(model.get_submodule(owner), name, keep)


def fix_tied_placements(
    device_map: Mapping[str, Any], tie_groups: Iterable[Sequence[str]]
) -> tuple[dict[str, Any], list[str]]:
    """Move tie-group members that a device map splits onto their first member's device.

    Each stray member's module (the tensor itself for root tensors) gets a key of its own, so
    the module runs where its tied weight lives. Returns the new map and one warning per move;
    the input map is not changed. Members the map does not cover are left to check_device_map.
    """
    result = dict(device_map)
    warnings: list[str] = []
    for group in tie_groups:
        warnings.extend(_fix_group(result, tuple(group)))
    for message in warnings:
        logger.warning(message)
    return result, warnings


def _fix_group(device_map: dict[str, Any], group: tuple[str, ...]) -> list[str]:
    found = {fqn: covering_entry(device_map, fqn) for fqn in group}
    covered = [fqn for fqn in group if found[fqn] is not None]
    if not covered:
        return []
    target = found[covered[0]][1]
    target_str = _placement_text(target)
    messages = []
    for fqn in covered[1:]:
        where = _placement_text(found[fqn][1])
        if where != target_str:
            key = fqn.rpartition(".")[0] or fqn
            _set_subtree(device_map, key, target)
            messages.append(
                f"tied tensors {list(group)} were split by the device map: moved {key!r} "
                f"(holding {fqn!r}) from {where} to {target_str}, where {covered[0]!r} is"
            )
    return messages


def _placement_text(value: Any) -> str:
    try:
        return placement_str(parse_placement(value, check_available=False))
    except (ValueError, TypeError):
        return str(value)


def _set_subtree(device_map: dict[str, Any], key: str, value: Any) -> None:
    for other in [k for k in device_map if k.startswith(f"{key}.")]:
        del device_map[other]
    device_map[key] = value
