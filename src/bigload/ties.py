"""Tie groups: tensors reachable under several fqns (identity), kept on one device, re-tied.

Groups list their members in registration order; the tensor lives where the plan places the
unit of its first member, and the other members use it from there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from .slots import iter_slots, tensor_groups


def tie_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Groups of fqns (parameters and buffers) that share one tensor object, in model order."""
    groups = tensor_groups(iter_slots(model))
    return [tuple(s.fqn for s in group) for group in groups if len(group) > 1]


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
