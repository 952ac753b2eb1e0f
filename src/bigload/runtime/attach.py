"""``dispatch``: attach the hooks a plan implies to a placed model, and ``remove_hooks``. It
decides nothing: units, their devices, the main device and the prefetch depth come from the plan,
the offloaded tensors from the store the loader filled."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..devicemap import covering_entry
from ..devices import cache_can_hold, is_accelerator, parse_device, placement_str
from ..errors import DispatchError
from ..offload import OffloadStore
from ..offload.stream import Streamer, layout
from ..place import refuse_meta
from ..plan import DevicePlan
from ..slots import TensorSlot, iter_slots
from .hooks import (
    HOOK_TYPES,
    STATE_ATTR,
    DispatchState,
    RootPostHook,
    RootPreHook,
    Unit,
    UnitPostHook,
    UnitPreHook,
    refuse_backward,
    swap_out,
)
from .moves import guard_moves, unguard_moves


def dispatch(
    model: nn.Module,
    plan: DevicePlan,
    store: OffloadStore | None = None,
    *,
    skip_keys: str | Sequence[str] | None = None,
    force_hooks: bool = False,
) -> nn.Module:
    """Attach the hooks ``plan`` implies to ``model``, whose tensors are where the plan says
    (as :func:`load_weights` or :func:`place_weights` leave them; ``store`` is theirs).

    A plan that runs the whole model where it lives needs no hooks (``force_hooks`` adds them:
    inputs then move to the model's device). Otherwise each unit is hooked: inputs move to its
    execution device, offloaded weights page in around its forward. ``skip_keys`` (default:
    the model's ``_skip_keys_device_placement``) name inputs that stay where they are (a KV
    cache). Sets ``model.bigload_plan`` and ``model.hf_device_map``. Returns ``model``.
    """
    store = store if store is not None else OffloadStore()
    if getattr(model, STATE_ATTR, None) is not None:
        remove_hooks(model)
    refuse_meta(model, plan, store)
    if plan.single_placement is None or store.items or force_hooks:
        keys = [skip_keys] if isinstance(skip_keys, str) else list(
            skip_keys if skip_keys is not None else _model_skip_keys(model))
        units = build_units(model, plan)
        streamer = _streamer(units, store, plan)
        _attach(model, DispatchState(units, store, plan.main, keys, plan.prefetch, streamer))
    _describe(model, plan)
    return model


def remove_hooks(model: nn.Module) -> nn.Module:
    """Undo a dispatch: remove the hooks (weights stay where they are stored). Returns model."""
    state: DispatchState | None = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    for handle in state.handles:
        handle.remove()
    for unit in state.units:
        swap_out(state, unit)
    for module in model.modules():
        _remove_hook_objects(module)
    unguard_moves(model)
    return model


def state_of(model: nn.Module) -> DispatchState | None:
    """The dispatch state of a dispatched model (its units, store, swaps), else None."""
    return model.__dict__.get(STATE_ATTR)


# --- units -------------------------------------------------------------------------------------
def build_units(model: nn.Module, plan: DevicePlan) -> list[Unit]:
    """One hooked unit per planned unit that holds a tensor (or borrows one)."""
    units = [
        Unit(pu.name, _hook_module(model, pu.name if pu.hook_at is None else pu.hook_at),
             pu.target, plan.execution_device(pu), plan.is_offloaded(pu))
        for pu in plan.local_units
    ]
    _assign_slots(model, units, set(plan.tensor_placements))
    return [u for u in units if u.slots or u.borrowed]


def _streamer(units: list[Unit], store: OffloadStore, plan: DevicePlan) -> Streamer | None:
    """The pool disk units stream through where memory is tight: ``1 + prefetch`` buffers of
    the largest unit, read for each use with the page cache dropped behind (the disk tier does
    not fit twice in what this process may still take, a memory cgroup included). Where memory
    is plentiful there is no pool: disk units run on views of their files, released after use,
    and the page cache (reclaimable, never the resident CPU tier) serves the next token from RAM
    without a copy (1 GB Llama, half on disk, warm: 0.12 s a decode step on views against
    0.19-0.27 s through the pool; evicted between tokens the pool's parallel reads win:
    docs/design.md)."""
    disk_tier = sum(i.nbytes for i in store.items.values() if i.tier == "disk")
    if cache_can_hold(disk_tier):
        return None
    sizes = [layout([store.items[s.fqn] for s in u.slots if s.fqn in store.items
                     and store.items[s.fqn].file is not None]).nbytes
             for u in units if u.streams]
    if not sizes or not max(sizes):
        return None
    return Streamer(max(sizes), 1 + plan.prefetch,
                    pin=plan.main.type == "cuda" and torch.cuda.is_available())


def _hook_module(model: nn.Module, name: str) -> nn.Module:
    """The module whose forward a unit hooks: the named module, or a tensor's owner."""
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        owner = name.rpartition(".")[0]
        return model.get_submodule(owner) if owner else model


def _assign_slots(model: nn.Module, units: list[Unit], apart: set[str]) -> None:
    """Each tensor belongs to the unit of its first name, unless the plan places it apart
    (resident). An alias in another unit *borrows* it (it is swapped in around that unit's
    forward too) when the owner pages it in or keeps it on another device than the one the
    alias runs on (a tied lm_head on GPU, its embedding on disk)."""
    by_name = {u.name: u for u in units}
    owner_of: dict[int, tuple[Unit, TensorSlot]] = {}
    for slot in iter_slots(model):
        found = covering_entry(by_name, slot.fqn)
        if found is None or slot.fqn in apart:
            continue
        unit, key = found[1], id(slot.tensor)
        if key not in owner_of:
            owner_of[key] = (unit, slot)
            unit.slots.append(slot)
            continue
        owner, owned = owner_of[key]
        if owner is not unit and _must_borrow(owner, unit) and owned not in unit.borrowed:
            unit.borrowed.append(owned)


def _must_borrow(owner: Unit, alias: Unit) -> bool:
    home = owner.placement if is_accelerator(owner.placement) else torch.device("cpu")
    return owner.swaps or home != alias.execution_device


def _attach(model: nn.Module, state: DispatchState) -> None:
    object.__setattr__(model, STATE_ATTR, state)
    for position, unit in enumerate(state.units):
        object.__setattr__(unit.module, STATE_ATTR, state)
        unit.module.register_forward_pre_hook(UnitPreHook(position), with_kwargs=True)
        unit.module.register_forward_hook(UnitPostHook(position), with_kwargs=True,
                                          always_call=True)
        if unit.swaps:
            refuse_backward(state, unit)
    model.register_forward_pre_hook(RootPreHook(), with_kwargs=True, prepend=True)
    model.register_forward_hook(RootPostHook(), with_kwargs=True, always_call=True)
    guard_moves(model, _check_move, state.main_device)


def _remove_hook_objects(module: nn.Module) -> None:
    for table, kw_table in (
        (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
        (module._forward_hooks, module._forward_hooks_with_kwargs),
    ):
        for key in [k for k, h in table.items() if isinstance(h, HOOK_TYPES)]:
            del table[key]
            kw_table.pop(key, None)
    module.__dict__.pop(STATE_ATTR, None)


def _model_skip_keys(model: nn.Module) -> list[str]:
    keys = getattr(model, "_skip_keys_device_placement", None) or []
    return [keys] if isinstance(keys, str) else list(keys)


# --- a dispatched model stays a normal model ---------------------------------------------------
def _check_move(
    model: nn.Module, device: object, dtype: torch.dtype | None, call: str
) -> nn.Module:
    """``model.to(...)`` of a dispatched model: a no-op where it already runs (and in the dtype
    it has), a DispatchError otherwise."""
    state: DispatchState = model.__dict__[STATE_ATTR]
    target = parse_device(device, check_available=False) if device is not None else None
    same_dtype = dtype is None or all(
        t.dtype == dtype for t in model.parameters() if t.is_floating_point())
    if (target is None or all(u.execution_device == target for u in state.units)) and same_dtype:
        return model
    placements = ", ".join(sorted({placement_str(u.placement) for u in state.units}))
    reason = (f"casting it to {dtype} would copy every offloaded weight into memory; load it "
              "with dtype=... instead") if not same_dtype else (
        f"it runs on {state.main_device} over {placements}, and {call} would undo that; "
        "call bigload.remove_hooks(model) first, or dispatch again with another map")
    raise DispatchError(f"{type(model).__name__} is dispatched: {reason}.")


def _describe(model: nn.Module, plan: DevicePlan) -> None:
    """``bigload_plan`` and transformers' ``hf_device_map`` (accelerator indices as ints)."""
    hf_map = {k: (v.index if is_accelerator(v) and v.type == "cuda" else placement_str(v))
              for k, v in plan.device_map.items()}
    for name, value in (("bigload_plan", plan), ("hf_device_map", hf_map)):
        try:
            object.__setattr__(model, name, value)
        except AttributeError:
            pass

