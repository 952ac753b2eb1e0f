"""Running a placed model: torch module hooks move inputs to each unit's execution device, page
offloaded weights in (prefetching the next units) and release them after use.

An offloaded parameter is always a real tensor where it is stored (CPU memory, or an mmap view
of a safetensors file); on an accelerator it is swapped in around its unit's forward, keeping
the parameter's identity (and so its ties). Nothing of a dispatched model is ever on ``meta``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .devicemap import (
    DeviceMap,
    covering_entry,
    normalize_device_map,
    placement_of,
    single_device,
)
from .devices import DISK, DeviceLike, Placement, is_accelerator, parse_device, placement_str
from .errors import (
    DeviceMapError,
    DispatchError,
    MetaTensorError,
    OffloadedParameterError,
    OffloadError,
    format_problems,
)
from .offload import (
    STORE_ATTR,
    OffloadStore,
    StoredTensor,
    content_digest,
    fingerprint,
    open_offload_folder,
    stored_views,
    write_offload_folder,
)
from .tensors import TensorSlot, iter_slots, materialize, replace_tensor

logger = logging.getLogger(__name__)

STATE_ATTR = "_bigload_dispatch"
ACCELERATOR_PREFETCH = 1


def prefetch_depth(
    prefetch: int | None = None, device: torch.device | None = None
) -> int | None:
    """Units fetched ahead: the argument, else ``BIGLOAD_PREFETCH``, else by execution device:
    1 on an accelerator (host-to-device copies overlap compute), 0 on the CPU. None when no
    device is known yet (the planner then applies the same rule to its main device).

    Each unit fetched ahead is resident early (a copy on an accelerator, mapped pages on the
    CPU): the planner reserves room for ``1 + depth`` offloaded units. On the CPU, measured on
    a 2-core machine (benchmarks/RESULTS.md), fetching ahead competed with the compute threads
    and the page-fault-driven reads of the running unit and made decode steps slower, hence 0.
    """
    if prefetch is None and os.environ.get("BIGLOAD_PREFETCH", "").strip():
        prefetch = int(os.environ["BIGLOAD_PREFETCH"])
    if prefetch is None and device is not None:
        prefetch = ACCELERATOR_PREFETCH if device.type != "cpu" else 0
    return None if prefetch is None else max(0, int(prefetch))


@dataclass
class Unit:
    """Tensors that page in and out together, hooked at ``module``'s forward."""

    name: str
    module: nn.Module
    placement: Placement
    execution_device: torch.device
    slots: list[TensorSlot] = field(default_factory=list)
    borrowed: list[TensorSlot] = field(default_factory=list)  # tie aliases paged by another unit

    @property
    def offloaded(self) -> bool:
        return self.placement == DISK or self.placement != self.execution_device

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


# --- public API ------------------------------------------------------------------------------

def dispatch_model(
    model: nn.Module,
    device_map: Any,
    main_device: DeviceLike | None = None,
    offload_dir: str | os.PathLike | None = None,
    offload_buffers: bool = False,
    skip_keys: str | Sequence[str] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    *,
    prefetch: int | None = None,
    force_hooks: bool = False,
) -> nn.Module:
    """Place ``model`` by ``device_map`` and attach the hooks that run it there.

    A map to one device is :func:`bigload.materialize` (meta tensors raise, listed). Maps over
    several devices, ``"cpu"`` and ``"disk"`` page offloaded weights in around each unit.
    Accepts a DevicePlan, a dict ``{module: device}``, or one device. Returns ``model``.
    ``offload_buffers`` is accepted for accelerate's signature: buffers of offloaded units page
    in with their weights either way (the planner's ``offload_buffers`` decides their budget).
    """
    dmap = normalize_device_map(device_map)
    if getattr(model, STATE_ATTR, None) is not None:
        remove_hooks(model)
    store = getattr(model, STORE_ATTR, None) or OffloadStore()
    one = single_device(dmap)
    if one is not None and one != DISK and not store.items and not force_hooks:
        materialize(model, one)
        _set_device_map(model, dmap)
        return model
    main = _choose_main(dmap, main_device)
    _check_coverage(model, dmap)
    _place_resident(model, dmap, store, main)
    _offload_to_disk(model, dmap, store, offload_dir)
    units = _build_units(model, dmap, main, preload_module_classes, _plan_units(device_map))
    keys = [skip_keys] if isinstance(skip_keys, str) else list(skip_keys or _model_skip_keys(model))
    state = DispatchState(units, store, main, keys, prefetch_depth(prefetch, main) or 0)
    _attach(model, state)
    _set_device_map(model, dmap)
    return model


def remove_hooks(model: nn.Module) -> nn.Module:
    """Undo a dispatch: remove the hooks (weights stay where they are stored). Returns model."""
    state: DispatchState | None = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    for handle in state.handles:
        handle.remove()
    for unit in state.units:
        _swap_out(state, unit)
    _remove_hook_objects(model)
    for name in ("to", "cpu", "cuda", "xpu", *_CASTS):
        model.__dict__.pop(name, None)
    return model


def cpu_offload(
    model: nn.Module, execution_device: DeviceLike | None = None, offload_buffers: bool = False,
    *, prefetch: int | None = None,
) -> nn.Module:
    """Keep every weight in CPU memory and run each block on ``execution_device`` (default: the
    first accelerator, else the CPU)."""
    device = _default_execution(execution_device)
    return dispatch_model(model, {"": "cpu"}, main_device=device, offload_buffers=offload_buffers,
                          prefetch=prefetch, force_hooks=True)


def disk_offload(
    model: nn.Module, offload_dir: str | os.PathLike, execution_device: DeviceLike | None = None,
    offload_buffers: bool = False, *, prefetch: int | None = None,
) -> nn.Module:
    """Serve every weight from ``offload_dir`` (safetensors, written once, fingerprinted) and
    run each block on ``execution_device``."""
    device = _default_execution(execution_device)
    return dispatch_model(model, {"": "disk"}, main_device=device, offload_dir=offload_dir,
                          offload_buffers=offload_buffers, prefetch=prefetch)


class UserCpuOffloadHook:
    """Returned by :func:`cpu_offload_with_hook`: ``offload()`` sends the model back to the CPU,
    ``remove()`` takes the hook away."""

    def __init__(self, model: nn.Module, device: torch.device, prev: UserCpuOffloadHook | None):
        self.model = model
        self.execution_device = device
        self.prev_module_hook = prev
        self.on_device = False
        self._handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.prev_module_hook is not None:
            self.prev_module_hook.offload()
        if not self.on_device:
            _move_all(self.model, self.execution_device)
            self.on_device = True
        return send_to_device((args, kwargs), self.execution_device)

    def offload(self) -> None:
        if self.on_device:
            _move_all(self.model, torch.device("cpu"))
            self.on_device = False

    def remove(self) -> None:
        self._handle.remove()


def cpu_offload_with_hook(
    model: nn.Module,
    execution_device: DeviceLike | None = None,
    prev_module_hook: UserCpuOffloadHook | None = None,
) -> tuple[nn.Module, UserCpuOffloadHook]:
    """Whole-model offload for chains of models (diffusion pipelines): the model moves to
    ``execution_device`` when it runs and stays there until ``hook.offload()``; running it first
    offloads ``prev_module_hook``'s model."""
    device = _default_execution(execution_device)
    materialize(model, "cpu")
    return model, UserCpuOffloadHook(model, device, prev_module_hook)


# --- placing the weights ---------------------------------------------------------------------

def _default_execution(device: DeviceLike | None) -> torch.device:
    if device is not None:
        return parse_device(device)
    from .devices import accelerator_type

    kind = accelerator_type()
    return torch.device(kind, 0) if kind else torch.device("cpu")


def _choose_main(dmap: DeviceMap, main_device: DeviceLike | None) -> torch.device:
    if main_device is not None:
        return parse_device(main_device)
    for placement in dmap.values():
        if is_accelerator(placement):
            return placement  # type: ignore[return-value]
    return torch.device("cpu")


def _check_coverage(model: nn.Module, dmap: DeviceMap) -> None:
    unknown = [k for k in dmap if k and not _names_something(model, k)]
    uncovered = [s.fqn for s in iter_slots(model)
                 if s.persistent and placement_of(dmap, s.fqn) is None]
    problems = [f"{k!r} names no module or tensor of {type(model).__name__}" for k in unknown]
    problems += [f"{n!r} is placed nowhere" for n in uncovered]
    if problems:
        raise DeviceMapError(
            f"the device map does not fit {type(model).__name__}:\n" + format_problems(problems)
            + "\nUse module names from model.named_modules() (or '' for the whole model)."
        )


def _names_something(model: nn.Module, name: str) -> bool:
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


def _place_resident(
    model: nn.Module, dmap: DeviceMap, store: OffloadStore, main: torch.device
) -> None:
    """Tensors placed on a device go there (after checking that none is left on meta);
    non-persistent buffers outside every unit go to the main device."""
    metas = []
    for slot in _unique_slots(model):
        placement = placement_of(dmap, slot.fqn)
        served = placement == DISK and slot.fqn in store.items
        if slot.tensor.device.type == "meta" and not served:
            metas.append(f"{slot.fqn!r} planned for {placement_str(placement)}")
    if metas:
        raise MetaTensorError(
            f"{len(metas)} tensor(s) of {type(model).__name__} are on 'meta' (no data), so they "
            "cannot be dispatched:\n" + format_problems(metas)
            + "\nLoad them first (bigload.load_checkpoint_and_dispatch does both) or "
            "bigload.materialize(model, device, missing='init')."
        )
    for slot in _unique_slots(model):
        placement = placement_of(dmap, slot.fqn) or main
        if placement == DISK and not slot.persistent:
            placement = main  # never in a file; tiny
        if placement != DISK and slot.tensor.device != placement and slot.fqn not in store.items:
            replace_tensor(slot, slot.tensor.to(placement))


def _unique_slots(model: nn.Module) -> Iterable[TensorSlot]:
    seen: set[int] = set()
    for slot in iter_slots(model):
        if id(slot.tensor) not in seen:
            seen.add(id(slot.tensor))
            yield slot


def _offload_to_disk(
    model: nn.Module, dmap: DeviceMap, store: OffloadStore, offload_dir: str | os.PathLike | None
) -> None:
    """Disk-placed tensors that are not yet served from a file are written once to
    ``offload_dir`` and replaced by views of it."""
    todo = [s for s in _unique_slots(model)
            if placement_of(dmap, s.fqn) == DISK and s.fqn not in store.items and s.persistent]
    # a tensor loaded into memory for a disk unit (e.g. initialised, not in the checkpoint) is
    # served from the store's CPU tier; nothing else is left in memory for a disk unit
    if not todo:
        return
    if offload_dir is None:
        raise OffloadError(
            f"{len(todo)} tensor(s) are placed on disk but held in memory, e.g. {todo[0].fqn!r}; "
            "pass offload_dir=... to write them there once (or load them with "
            "bigload.load_checkpoint_and_dispatch, which serves safetensors files directly)"
        )
    specs = [(s.fqn, s.tensor.dtype, tuple(s.tensor.shape)) for s in todo]
    value = fingerprint(type(model).__name__, specs,
                        "model tensors " + content_digest((s.fqn, s.tensor) for s in todo))
    folder = Path(offload_dir).resolve()
    reader = open_offload_folder(folder, value)
    if reader is None:
        by_name = {s.fqn: s for s in todo}
        reader, written = write_offload_folder(folder, specs, lambda n: by_name[n].tensor, value)
        store.bytes_written += written
    store.readers.append(reader)
    slots = {s.fqn: s for s in todo}
    for item in stored_views(reader):
        store.add(item)
        replace_tensor(slots[item.fqn], item.tensor)
    object.__setattr__(model, STORE_ATTR, store)


# --- units and hooks -------------------------------------------------------------------------

def _build_units(
    model: nn.Module, dmap: DeviceMap, main: torch.device,
    preload: Sequence[str] | None, plan_units: DeviceMap | None,
) -> list[Unit]:
    """Hooked units: the plan's own units when a DevicePlan is given; otherwise the map's
    entries, offloaded ones split into blocks (declared no-split or ``preload_module_classes``
    modules stay whole) so that they page in one block at a time."""
    keep_whole = set(preload or ()) | set(getattr(model, "_no_split_modules", None) or ())
    units: list[Unit] = []
    for name, placement in (plan_units or dmap).items():
        execution = _execution_device(placement, main)
        offloaded = placement == DISK or placement != execution
        whole = plan_units is not None or not offloaded
        pieces = [(name, _hook_module(model, name))] if whole else _split_key(
            model, name, keep_whole)
        units.extend(Unit(n, _preloading_ancestor(model, n, preload) or module, placement,
                          execution) for n, module in pieces)
    _assign_slots(model, units)
    return [u for u in units if u.slots or u.borrowed]


def _preloading_ancestor(
    model: nn.Module, name: str, preload: Sequence[str] | None
) -> nn.Module | None:
    """The outermost module of a ``preload_module_classes`` class that contains unit ``name``:
    the unit pages in around *its* forward, for weights it reads from its children directly."""
    if not preload:
        return None
    parts = name.split(".") if name else []
    for depth in range(len(parts) + 1):
        try:
            module = model.get_submodule(".".join(parts[:depth]))
        except AttributeError:
            return None
        if type(module).__name__ in preload:
            return module
    return None


def _plan_units(device_map: Any) -> DeviceMap | None:
    units = getattr(device_map, "units", None)
    if units is None or isinstance(device_map, Mapping):
        return None
    return {u.name: normalize_device_map({"": u.placement})[""] for u in units}


def _execution_device(placement: Placement, main: torch.device) -> torch.device:
    if placement == DISK or placement == torch.device("cpu"):
        return main
    return placement  # type: ignore[return-value]


def _hook_module(model: nn.Module, name: str) -> nn.Module:
    """The module whose forward a unit hooks: the named module, or a tensor's owner."""
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        owner = name.rpartition(".")[0]
        return model.get_submodule(owner) if owner else model


def _split_key(model: nn.Module, name: str, keep_whole: set[str]) -> list[tuple[str, nn.Module]]:
    try:
        module = model.get_submodule(name) if name else model
    except AttributeError:  # a tensor key: its owner runs it
        return [(name, _hook_module(model, name))]
    return list(_split(name, module, keep_whole))


def _split(name: str, module: nn.Module, keep_whole: set[str]) -> Iterable[tuple[str, nn.Module]]:
    direct = any(t is not None for t in module._parameters.values()) or any(
        t is not None for t in module._buffers.values())
    if direct or type(module).__name__ in keep_whole or not any(True for _ in module.children()):
        yield name, module
        return
    for child_name, child in module.named_children():
        yield from _split(f"{name}.{child_name}" if name else child_name, child, keep_whole)


def _assign_slots(model: nn.Module, units: list[Unit]) -> None:
    """Each tensor belongs to the unit of its first name. A tie alias in another unit that runs
    on an accelerator while the owner pages its weights in *borrows* the tensor: it is swapped
    in around that unit's forward too (a tied lm_head on GPU, its embedding on disk)."""
    by_name = {u.name: u for u in units}
    owner_of: dict[int, tuple[Unit, TensorSlot]] = {}
    aliases: list[tuple[Unit, int]] = []
    for slot in iter_slots(model):
        found = covering_entry(by_name, slot.fqn)
        if found is None:
            continue
        unit = found[1]
        key = id(slot.tensor)
        if key not in owner_of:
            owner_of[key] = (unit, slot)
            unit.slots.append(slot)
        elif owner_of[key][0] is not unit:
            aliases.append((unit, key))
    for unit, key in aliases:
        owner, slot = owner_of[key]
        if owner.swaps and slot not in unit.borrowed:
            unit.borrowed.append(slot)


def _attach(model: nn.Module, state: DispatchState) -> None:
    """Hooks are small objects that find the state through their module, so a deep copy of the
    model gets hooks that run on the copy."""
    object.__setattr__(model, STATE_ATTR, state)
    for position, unit in enumerate(state.units):
        object.__setattr__(unit.module, STATE_ATTR, state)
        unit.module.register_forward_pre_hook(_UnitPreHook(position), with_kwargs=True)
        unit.module.register_forward_hook(_UnitPostHook(position), with_kwargs=True)
        if unit.swaps:
            _refuse_backward(state, unit)
    model.register_forward_pre_hook(_RootPreHook(), with_kwargs=True, prepend=True)
    model.register_forward_hook(_RootPostHook(), with_kwargs=True)
    model.__dict__["to"] = types.MethodType(_guarded_to, model)
    _guard_casts(model)


class _UnitPreHook:
    def __init__(self, position: int):
        self.position = position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state: DispatchState = module.__dict__[STATE_ATTR]
        unit = state.units[self.position]
        if unit.offloaded:
            state.store.wait(s.fqn for s in unit.slots)
            _check_unchanged(state, unit)
            if unit.swaps:
                _swap_in(state, unit, unit.slots)
            _prefetch_next(state, self.position)
        if unit.borrowed:
            _swap_in(state, unit, unit.borrowed)
        return send_to_device((args, kwargs), unit.execution_device, state.skip_keys)


class _UnitPostHook:
    def __init__(self, position: int):
        self.position = position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state: DispatchState = module.__dict__[STATE_ATTR]
        unit = state.units[self.position]
        if unit.swaps or unit.borrowed:
            _swap_out(state, unit)
        if unit.placement == DISK:
            state.store.release(s.fqn for s in unit.slots)
        return output


class _RootPreHook:
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state: DispatchState = module.__dict__[STATE_ATTR]
        state.caller_device = _first_device((args, kwargs))
        return None


class _RootPostHook:
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state: DispatchState = module.__dict__[STATE_ATTR]
        device = state.caller_device
        return send_to_device(output, device, state.skip_keys) if device is not None else output


_HOOK_TYPES = (_UnitPreHook, _UnitPostHook, _RootPreHook, _RootPostHook)


def _remove_hook_objects(model: nn.Module) -> None:
    for module in model.modules():
        for table, kw_table in (
            (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
            (module._forward_hooks, module._forward_hooks_with_kwargs),
        ):
            for key in [k for k, h in table.items() if isinstance(h, _HOOK_TYPES)]:
                del table[key]
                kw_table.pop(key, None)
        module.__dict__.pop(STATE_ATTR, None)


def _check_unchanged(state: DispatchState, unit: Unit) -> None:
    """In-place edits of disk-tier weights would be dropped with their pages: refuse them."""
    if unit.placement != DISK:
        return
    for slot in unit.slots:
        item = state.store.items.get(slot.fqn)
        if item is not None and item.mm is not None and slot.tensor._version != item.version:
            raise OffloadedParameterError(
                f"{slot.fqn!r} is served from disk (a read-only view of "
                f"{item.byte_range and 'its safetensors file'}) and was changed in place; the "
                "change would be lost when its pages are released. Place its module on 'cpu' or "
                "an accelerator to edit it, or save the edited weights as a new checkpoint."
            )


def _refuse_backward(state: DispatchState, unit: Unit) -> None:
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


def _swap_in(state: DispatchState, unit: Unit, slots: list[TensorSlot]) -> None:
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
            copy_ = _stored(state, slot).to(unit.execution_device, non_blocking=True)
        state.swapped[slot.fqn] = copy_
        mine.append(slot)
        replace_tensor(slot, copy_)


def _swap_out(state: DispatchState, unit: Unit) -> None:
    """Swap back what this unit swapped in: the parameters hold their stored tensors again."""
    for slot in state.swapped_by.pop(id(unit), []):
        if state.swapped.pop(slot.fqn, None) is not None:
            replace_tensor(slot, _stored(state, slot))


def _stored(state: DispatchState, slot: TensorSlot) -> torch.Tensor:
    item: StoredTensor | None = state.store.items.get(slot.fqn)
    if item is None:  # resident on CPU, not in a store (e.g. cpu_offload of an in-RAM model)
        item = StoredTensor(slot.fqn, slot.tensor, "cpu")
        state.store.add(item)
    return item.tensor


def _prefetch_next(state: DispatchState, position: int) -> None:
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
            source = _stored(state, slot)
            copies[slot.fqn] = source.to(unit.execution_device, non_blocking=True)
    for tensor in copies.values():
        tensor.record_stream(torch.cuda.current_stream(unit.execution_device))
    state.ahead[unit.name] = copies


# --- moving activations ----------------------------------------------------------------------

def send_to_device(obj: Any, device: torch.device | None, skip_keys: Sequence[str] = ()) -> Any:
    """``obj`` with every tensor on ``device`` (tuples, lists, dicts, dataclasses, model outputs);
    values under ``skip_keys`` (e.g. a KV cache) stay where they are."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device or obj.device.type == "meta" else obj.to(device)
    if isinstance(obj, Mapping):
        moved = {k: v if k in skip_keys else send_to_device(v, device, skip_keys)
                 for k, v in obj.items()}
        return _rebuild_mapping(obj, moved)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(send_to_device(v, device, skip_keys) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(send_to_device(v, device, skip_keys) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: send_to_device(getattr(obj, f.name), device, skip_keys)
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


def _rebuild_mapping(original: Mapping, moved: dict) -> Any:
    if type(original) is dict:
        return moved
    try:
        return type(original)(**moved)
    except TypeError:
        try:
            return type(original)(moved)
        except TypeError:
            return moved


def _first_device(obj: Any) -> torch.device | None:
    if isinstance(obj, torch.Tensor):
        return obj.device
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for value in obj:
            found = _first_device(value)
            if found is not None:
                return found
    return None


# --- a dispatched model stays a normal model -------------------------------------------------

def _guarded_to(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """``model.to(...)`` of a dispatched model: a no-op where it already runs (and in the dtype
    it has), a DispatchError otherwise."""
    device, dtype, _non_blocking, _fmt = torch._C._nn._parse_to(*args, **kwargs)
    return _check_move(model, device, dtype, f".to({', '.join(map(str, args))})")


def _check_move(model: nn.Module, device: Any, dtype: torch.dtype | None, call: str) -> nn.Module:
    state: DispatchState = model.__dict__[STATE_ATTR]
    target = parse_device(device, check_available=False) if device is not None else None
    same_dtype = dtype is None or all(
        t.dtype == dtype for t in model.parameters() if t.is_floating_point())
    if (target is None or _same_device(target, state)) and same_dtype:
        return model
    reason = (f"casting it to {dtype} would copy every offloaded weight into memory; load it "
              "with dtype=... instead") if not same_dtype else (
        f"it runs on {state.main_device} over {_placements(state)}, and {call} would undo that; "
        "call bigload.remove_hooks(model) first, or dispatch again with another map")
    raise DispatchError(f"{type(model).__name__} is dispatched: {reason}.")


_CASTS = {"half": torch.float16, "float": torch.float32, "double": torch.float64,
          "bfloat16": torch.bfloat16}


def _guard_casts(model: nn.Module) -> None:
    """``half()``/``float()``/``cuda()``/``cpu()``... bypass ``to``: guard them the same way."""
    for name, dtype in _CASTS.items():
        model.__dict__[name] = types.MethodType(
            lambda m, _d=dtype, _n=name: _check_move(m, None, _d, f".{_n}()"), model)
    for kind in ("cuda", "xpu"):
        model.__dict__[kind] = types.MethodType(
            lambda m, device=None, _k=kind, **_kw: _check_move(
                m, torch.device(_k, device if isinstance(device, int) else 0)
                if not isinstance(device, (str, torch.device)) else device, None, f".{_k}()"),
            model)
    model.__dict__["cpu"] = types.MethodType(lambda m: _check_move(m, "cpu", None, ".cpu()"), model)


def _same_device(device: torch.device, state: DispatchState) -> bool:
    return all(u.execution_device == device for u in state.units)


def _placements(state: DispatchState) -> str:
    return ", ".join(sorted({placement_str(u.placement) for u in state.units}))


def _move_all(model: nn.Module, device: torch.device) -> None:
    for slot in _unique_slots(model):
        if slot.tensor.device != device:
            replace_tensor(slot, slot.tensor.to(device, non_blocking=True))


def _model_skip_keys(model: nn.Module) -> list[str]:
    keys = getattr(model, "_skip_keys_device_placement", None) or []
    return [keys] if isinstance(keys, str) else list(keys)


def _set_device_map(model: nn.Module, dmap: DeviceMap) -> None:
    value = {k: (v.index if is_accelerator(v) and v.type == "cuda" else placement_str(v))
             for k, v in dmap.items()}
    try:
        object.__setattr__(model, "hf_device_map", value)
    except AttributeError:
        pass
