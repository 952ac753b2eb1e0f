"""Where a model's tensors live: one ``TensorSlot`` per (module, parameter or buffer name), and
the one rule that groups slots by tensor identity (a tie is one tensor under several names)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from .errors import UnknownTensorError


class TensorSlot(NamedTuple):
    """Where a tensor lives: ``owner._parameters[leaf]`` or ``owner._buffers[leaf]``. (A named
    tuple: models have tens of thousands of slots, and planning walks them all.)"""

    fqn: str
    owner: nn.Module
    leaf: str
    is_param: bool
    persistent: bool

    @property
    def tensor(self) -> torch.Tensor:
        table = self.owner._parameters if self.is_param else self.owner._buffers
        return table[self.leaf]

    @property
    def kind(self) -> str:
        return "parameter" if self.is_param else "buffer"


def iter_slots(model: nn.Module) -> Iterator[TensorSlot]:
    """Every parameter and buffer slot, tied aliases included, in registration order."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for leaf, param in module._parameters.items():
            if param is not None:
                yield TensorSlot(dot + leaf, module, leaf, True, True)
        for leaf, buf in module._buffers.items():
            if buf is not None:
                persistent = leaf not in module._non_persistent_buffers_set
                yield TensorSlot(dot + leaf, module, leaf, False, persistent)


def tensor_groups(slots: Iterable[TensorSlot]) -> list[list[TensorSlot]]:
    """``slots`` grouped by tensor identity, in first-seen order: each group is one tensor and
    every name it goes by (a group of several is a tie)."""
    groups: dict[int, list[TensorSlot]] = {}
    for slot in slots:
        key = id(slot.tensor)
        group = groups.get(key)
        if group is None:
            groups[key] = [slot]
        else:
            group.append(slot)
    return list(groups.values())


def unique_slots(model: nn.Module) -> list[TensorSlot]:
    """The first slot of each distinct tensor of ``model``."""
    return [group[0] for group in tensor_groups(iter_slots(model))]


def find_slot(model: nn.Module, tensor_name: str) -> TensorSlot:
    """The slot of ``tensor_name`` ('encoder.0.weight'); a clear error when there is none."""
    module_path, _, leaf = tensor_name.rpartition(".")
    try:
        owner = model.get_submodule(module_path) if module_path else model
    except AttributeError as err:
        raise UnknownTensorError(
            f"{type(model).__name__} has no submodule {module_path!r} (for tensor {tensor_name!r})"
        ) from err
    if owner._parameters.get(leaf) is not None:
        return TensorSlot(tensor_name, owner, leaf, True, True)
    if owner._buffers.get(leaf) is not None:
        persistent = leaf not in owner._non_persistent_buffers_set
        return TensorSlot(tensor_name, owner, leaf, False, persistent)
    known = [*owner._parameters, *owner._buffers]
    raise UnknownTensorError(
        f"{type(owner).__name__} at {module_path or '<root>'!r} has no parameter or buffer "
        f"{leaf!r} (for tensor {tensor_name!r}); it has: {', '.join(known) or 'none'}"
    )


def names_something(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a module or a tensor fqn of ``model`` (``""`` is the model)."""
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        owner, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(owner) if owner else model
        except AttributeError:
            return False
        return leaf in module._parameters or leaf in module._buffers
