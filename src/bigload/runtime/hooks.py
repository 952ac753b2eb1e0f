"""The hooks of a dispatched model: around each unit's forward, inputs move to its execution
device, offloaded weights page in (the next units fetched ahead) and are released after.

An offloaded unit's weights are *swapped* into their parameters (identity kept) for its forward
and swapped back after: disk-tier weights come from the streaming pool (read for each use, the
next unit read ahead), CPU-tier weights are copied to the accelerator that runs them. Between
forwards every parameter holds its stored tensor (CPU memory, or a view of its file).

Hooks are small objects that find their state through their module, so a ``copy.deepcopy`` of a
dispatched model runs on the copy. A model-wide lock makes concurrent forwards from several
threads take turns (the paging state is shared).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..devices import DISK, Placement, placement_str
from ..errors import OffloadedParameterError
from ..offload import OffloadStore, StoredTensor
from ..offload.stream import Streamer
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

    @property
    def streams(self) -> bool:
        """Weights are read from disk into the streaming pool for each use."""
        return self.offloaded and self.placement == DISK


class DispatchState:
    """Everything a dispatch attached to a model; ``remove_hooks`` undoes it."""

    def __init__(self, units: list[Unit], store: OffloadStore, main_device: torch.device,
                 skip_keys: Sequence[str], depth: int, streamer: Streamer | None = None):
        self.units = units
        self.store = store
        self.main_device = main_device
        self.skip_keys = tuple(skip_keys)
        self.depth = depth
        self.streamer = streamer
        self.handles: list[Any] = []
        self.swapped: dict[str, torch.Tensor] = {}  # fqn -> tensor swapped in while a unit runs
        self.swapped_by: dict[int, list[TensorSlot]] = {}  # id(unit) -> what it swapped in
        self.streaming: set[str] = set()  # units holding a pool buffer
        self.ahead: dict[str, dict[str, torch.Tensor]] = {}  # unit -> prefetched device copies
        self.stream = _side_stream(main_device)
        self.caller_device: torch.device | None = None
        self.lock = threading.RLock()
        self.entered = threading.local()  # per thread: the positions whose pre-hook ran

    def __deepcopy__(self, memo: dict) -> DispatchState:
        """The copy runs the same way, but torch's deepcopy has cloned every weight into
        memory: its disk units become CPU units with a store of their own."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.units = copy.deepcopy(self.units, memo)  # the copy's modules and slots
        for unit in new.units:
            if unit.placement == DISK:
                unit.placement = torch.device("cpu")
                unit.offloaded = unit.execution_device.type != "cpu"
        new.store, new.streamer = OffloadStore(), None
        new.handles, new.swapped, new.swapped_by, new.ahead = [], {}, {}, {}
        new.streaming, new.lock, new.entered = set(), threading.RLock(), threading.local()
        return new

    def enter(self, position: int) -> None:
        self.lock.acquire()
        stack = getattr(self.entered, "stack", None)
        if stack is None:
            stack = self.entered.stack = []
        stack.append(position)

    def leave(self, position: int) -> bool:
        """Whether this thread entered ``position`` (then the lock is released)."""
        stack = getattr(self.entered, "stack", [])
        if not stack or stack[-1] != position:
            return False
        stack.pop()
        self.lock.release()
        return True


def _side_stream(device: torch.device) -> Any:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.Stream(device)
    return None


ROOT = -1  # the position of the root hooks in ``entered``


class UnitPreHook:
    def __init__(self, position: int):
        self.position = position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state: DispatchState = module.__dict__[STATE_ATTR]
        state.enter(self.position)  # left by UnitPostHook, which runs even when this raises
        unit = state.units[self.position]
        if unit.offloaded:
            state.store.wait(s.fqn for s in unit.slots)
            check_unchanged(state, unit)
            page_in(state, unit)
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
        try:
            if id(unit) in state.swapped_by:
                swap_out(state, unit)
            page_out(state, unit)
        finally:
            state.leave(self.position)
        return output


class RootPreHook:
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state: DispatchState = module.__dict__[STATE_ATTR]
        state.enter(ROOT)
        if len(state.entered.stack) == 1:
            _recover(state)
        state.caller_device = first_device((args, kwargs))
        return None


class RootPostHook:
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state: DispatchState = module.__dict__[STATE_ATTR]
        device = state.caller_device
        try:
            return send_to_device(output, device, state.skip_keys) if device is not None else (
                output)
        finally:
            state.leave(ROOT)


HOOK_TYPES = (UnitPreHook, UnitPostHook, RootPreHook, RootPostHook)


def _recover(state: DispatchState) -> None:
    """A forward interrupted where no hook could clean up (KeyboardInterrupt) leaves weights
    swapped in: put them back before the next forward starts."""
    if not (state.swapped_by or state.streaming):
        return
    for unit in state.units:
        if id(unit) in state.swapped_by:
            swap_out(state, unit)
        page_out(state, unit)


# --- paging -------------------------------------------------------------------------------------
def page_in(state: DispatchState, unit: Unit) -> None:
    """Bring an offloaded unit's weights to where it runs: disk-tier weights from the streaming
    pool, CPU-tier weights copied to the accelerator. Under autograd on the CPU, disk-tier
    weights are used as the file views they are (a pool buffer is reused by the next unit, so
    tensors saved for backward must not live there)."""
    if unit.streams and state.streamer is not None and _stream_now(unit):
        host = state.streamer.take(unit.name, _disk_items(state, unit))
        state.streaming.add(unit.name)
        swap_in(state, unit, unit.slots, host)
        return
    if unit.placement == DISK:
        state.store.check_mapped(s.fqn for s in unit.slots)
    if unit.swaps:
        swap_in(state, unit, unit.slots)


def page_out(state: DispatchState, unit: Unit) -> None:
    if unit.name in state.streaming:
        state.streaming.discard(unit.name)
        after = None
        if unit.execution_device.type == "cuda":  # copies from the pool may still be in flight
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(unit.execution_device))
        state.streamer.release(unit.name, after)  # type: ignore[union-attr]
    elif unit.placement == DISK:
        state.store.release(s.fqn for s in unit.slots)


def _stream_now(unit: Unit) -> bool:
    return not torch.is_grad_enabled() or unit.swaps or not any(
        s.tensor.requires_grad for s in unit.slots)


def _disk_items(state: DispatchState, unit: Unit) -> list[StoredTensor]:
    items = (state.store.items.get(s.fqn) for s in unit.slots)
    return [i for i in items if i is not None and i.tier == "disk" and i.file is not None]


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


def swap_in(state: DispatchState, unit: Unit, slots: list[TensorSlot],
            host: dict[str, torch.Tensor] | None = None) -> None:
    """Swap ``slots`` for their tensors on the unit's execution device (identity kept): from
    ``host`` (the streaming pool) or the stored tensors, copied over when the unit runs on an
    accelerator. A tensor already swapped in (by an enclosing unit) is left as it is."""
    ready = state.ahead.pop(unit.name, None)
    if ready is not None and state.stream is not None:
        torch.cuda.current_stream(unit.execution_device).wait_stream(state.stream)
    mine = state.swapped_by.setdefault(id(unit), [])
    for slot in slots:
        if slot.fqn in state.swapped:
            continue
        value = ready.get(slot.fqn) if ready else None
        if value is None:
            source = host.get(slot.fqn) if host else None
            source = stored(state, slot) if source is None else source
            value = source.to(unit.execution_device, non_blocking=True)
        state.swapped[slot.fqn] = value
        mine.append(slot)
        replace_tensor(slot, value)


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
        if unit.streams and state.streamer is not None and _stream_now(unit):
            state.streamer.start(unit.name, _disk_items(state, unit))
        elif unit.placement == DISK:  # on the CPU the forward maps the pages itself
            state.store.prefetch((s.fqn for s in unit.slots), map_pages=unit.swaps)
        if unit.swaps and not unit.streams and state.stream is not None and (
                unit.name not in state.ahead):
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
