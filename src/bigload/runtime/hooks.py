"""The hooks of a dispatched model: around each unit's forward, inputs move to its execution
device, offloaded weights page in (the next units fetched ahead) and are released after.

Hooks are small objects that find their state through their module, so a ``copy.deepcopy`` of
a dispatched model runs on the copy. On an accelerator an offloaded unit's weights are copied in
on a side stream and swapped into their parameters (identity kept) for the forward.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..devices import DISK, Placement, placement_str
from ..errors import OffloadedParameterError
from ..offload import OffloadStore, StoredTensor
from ..slots import TensorSlot
from ..tensors import replace_tensor
from .moves import first_device, send_to_device

STATE_ATTR = "_bigload_dispatch"  # the DispatchState, on the model and on each hooked module


@dataclass
class Unit:
    """Tensors that page in and out together, hooked at ``module``'s forward."""

    name: str
    module: nn.Module
    placement: Placement
    execution_device: torch.device
    offloaded: bool
    slots: list[TensorSlot] = field(default_factory=list)
    borrowed: list[TensorSlot] = field(default_factory=list)  # tie aliases kept by another unit

    @property
    def swaps(self) -> bool:
        """Weights must be copied in: stored on CPU/disk, run on an accelerator."""
        return self.offloaded and self.execution_device.type != "cpu"


class DispatchState:
    """Everything a dispatch attached to a model; ``remove_hooks`` undoes it."""

    def __init__(self, units: list[Unit], store: OffloadStore, main_device: torch.device,
                 skip_keys: Sequence[str], depth: int):
        self.units = units
        self.store = store
        self.main_device = main_device
        self.skip_keys = tuple(skip_keys)
        self.depth = depth
        self.handles: list[Any] = []
        self.swapped: dict[str, torch.Tensor] = {}  # fqn -> device copy while a unit runs
        self.swapped_by: dict[int, list[TensorSlot]] = {}  # id(unit) -> what it swapped in
        self.ahead: dict[str, dict[str, torch.Tensor]] = {}  # unit -> prefetched device copies
        self.stream = _side_stream(main_device)
        self.caller_device: torch.device | None = None

    def __deepcopy__(self, memo: dict) -> DispatchState:
        """The copy runs the same way, but torch's deepcopy has cloned every weight into
        memory: its disk units become CPU units with a store of their own."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.units = copy.deepcopy(self.units, memo)  # the copy's modules and slots
        for unit in new.units:
            if unit.placement == DISK:
                unit.placement = torch.device("cpu")
        new.store = OffloadStore()
        new.handles, new.swapped, new.swapped_by, new.ahead = [], {}, {}, {}
        return new


def _side_stream(device: torch.device) -> Any:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.Stream(device)
    return None


class UnitPreHook:
    def __init__(self, position: int):
        self.position = position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state: DispatchState = module.__dict__[STATE_ATTR]
        unit = state.units[self.position]
        if unit.offloaded:
            state.store.wait(s.fqn for s in unit.slots)
            check_unchanged(state, unit)
            if unit.swaps:
                swap_in(state, unit, unit.slots)
            prefetch_next(state, self.position)
        if unit.borrowed:
            swap_in(state, unit, unit.borrowed)
        return send_to_device((args, kwargs), unit.execution_device, state.skip_keys)


class UnitPostHook:
    def __init__(self, position: int):
        self.position = position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state: DispatchState = module.__dict__[STATE_ATTR]
        unit = state.units[self.position]
        if unit.swaps or unit.borrowed:
            swap_out(state, unit)
        if unit.placement == DISK:
            state.store.release(s.fqn for s in unit.slots)
        return output


class RootPreHook:
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state: DispatchState = module.__dict__[STATE_ATTR]
        state.caller_device = first_device((args, kwargs))
        return None


class RootPostHook:
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state: DispatchState = module.__dict__[STATE_ATTR]
        device = state.caller_device
        return send_to_device(output, device, state.skip_keys) if device is not None else output


HOOK_TYPES = (UnitPreHook, UnitPostHook, RootPreHook, RootPostHook)


def check_unchanged(state: DispatchState, unit: Unit) -> None:
    """In-place edits of disk-tier weights would be dropped with their pages: refuse them."""
    if unit.placement != DISK:
        return
    for slot in unit.slots:
        item = state.store.items.get(slot.fqn)
        if item is not None and item.mm is not None and slot.tensor._version != item.version:
            raise OffloadedParameterError(
                f"{slot.fqn!r} is served from disk (a read-only view of its safetensors file) "
                "and was changed in place; the change would be lost when its pages are "
                "released. Place its module on 'cpu' or an accelerator to edit it, or save the "
                "edited weights as a new checkpoint."
            )


def refuse_backward(state: DispatchState, unit: Unit) -> None:
    def refuse(param: torch.Tensor) -> None:
        raise OffloadedParameterError(
            f"backward reached a weight of {unit.name or 'the model'!r}, which is offloaded to "
            f"{placement_str(unit.placement)} and only copied to {unit.execution_device} for its "
            "forward: its gradient would be lost. Run offloaded models under torch.no_grad(), or "
            "place the trained modules on the accelerator."
        )

    for slot in unit.slots:
        tensor = slot.tensor
        if slot.is_param and tensor.requires_grad:
            state.handles.append(tensor.register_post_accumulate_grad_hook(refuse))


def swap_in(state: DispatchState, unit: Unit, slots: list[TensorSlot]) -> None:
    """Copy ``slots`` to the unit's execution device and swap them into their parameters
    (identity kept). A tensor already swapped in (by an enclosing unit) is left as it is."""
    ready = state.ahead.pop(unit.name, None)
    if ready is not None and state.stream is not None:
        torch.cuda.current_stream(unit.execution_device).wait_stream(state.stream)
    mine = state.swapped_by.setdefault(id(unit), [])
    for slot in slots:
        if slot.fqn in state.swapped:
            continue
        copy_ = ready.get(slot.fqn) if ready else None
        if copy_ is None:
            copy_ = stored(state, slot).to(unit.execution_device, non_blocking=True)
        state.swapped[slot.fqn] = copy_
        mine.append(slot)
        replace_tensor(slot, copy_)


def swap_out(state: DispatchState, unit: Unit) -> None:
    """Swap back what this unit swapped in: the parameters hold their stored tensors again."""
    for slot in state.swapped_by.pop(id(unit), []):
        if state.swapped.pop(slot.fqn, None) is not None:
            replace_tensor(slot, stored(state, slot))


def stored(state: DispatchState, slot: TensorSlot) -> torch.Tensor:
    item: StoredTensor | None = state.store.items.get(slot.fqn)
    if item is None:  # resident, not in a store (e.g. cpu_offload of an in-RAM model)
        item = StoredTensor(slot.fqn, slot.tensor, "cpu")
        state.store.add(item)
    return item.tensor


def prefetch_next(state: DispatchState, position: int) -> None:
    if state.depth <= 0:
        return
    # in execution order, wrapping around: the next forward (the next token) starts at the top
    order = state.units[position + 1:] + state.units[:position]
    upcoming = [u for u in order if u.offloaded][: state.depth]
    for unit in upcoming:
        if unit.placement == DISK:
            state.store.prefetch(s.fqn for s in unit.slots)
        if unit.swaps and state.stream is not None and unit.name not in state.ahead:
            _copy_ahead(state, unit)


def _copy_ahead(state: DispatchState, unit: Unit) -> None:
    """Start the host-to-device copies of ``unit`` on the side stream."""
    with torch.cuda.stream(state.stream):
        copies = {}
        for slot in unit.slots:
            copies[slot.fqn] = stored(state, slot).to(unit.execution_device, non_blocking=True)
    for tensor in copies.values():
        tensor.record_stream(torch.cuda.current_stream(unit.execution_device))
    state.ahead[unit.name] = copies
