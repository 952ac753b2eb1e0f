"""Moving a model's tensors between devices, off ``meta`` included, without ever exposing
uninitialised memory. ``set_module_tensor_to_device`` moves one tensor, ``materialize`` a model.

A parameter keeps its Python identity when it moves (``torch.utils.swap_tensors``), so every alias
of a tied parameter sees the new data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn

from .devices import DISK, DeviceLike, parse_device, parse_dtype
from .errors import (
    DeviceError,
    DtypeError,
    MetaTensorError,
    NoInitError,
    ShapeMismatchError,
    SkeletonError,
    format_problems,
)
from .skeleton import rebuild_parameter
from .slots import TensorSlot, find_slot, unique_slots

logger = logging.getLogger(__name__)

Missing = Literal["error", "init", "zeros"]
MISSING_POLICIES: tuple[str, ...] = ("error", "init", "zeros")
InitFn = Callable[[nn.Module], None]


def parse_target(device: DeviceLike) -> torch.device:
    if isinstance(device, str) and device.strip().lower() == DISK:
        raise DeviceError(
            "'disk' is a placement for a whole model, not one tensor: use "
            "bigload.dispatch_model(model, device_map, offload_dir=...) or "
            "bigload.load_checkpoint_and_dispatch(...); here use 'cpu' or an accelerator"
        )
    return parse_device(device)


def _check_cast(tensor_name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Refuse a cast of a float tensor to a non-float dtype (torch would truncate the values, or
    refuse it for a parameter that requires grad)."""
    if dtype is None or dtype.is_floating_point or not tensor.is_floating_point():
        return
    raise DtypeError(
        f"{tensor_name!r} is a {tensor.dtype} tensor; dtype={dtype} would cast it to a non-float "
        "dtype, and bigload casts floats to float dtypes only (int and bool tensors keep their "
        "own dtype). Pass a float dtype such as torch.bfloat16, or dtype=None to keep it."
    )


def cast_like(value: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floats go to ``dtype`` (or ``like``'s float dtype); int/bool are never cast."""
    if not value.is_floating_point():
        return value
    if dtype is not None:
        return value.to(dtype)
    if like.is_floating_point() and like.dtype != value.dtype:
        return value.to(like.dtype)
    return value


def set_module_tensor_to_device(
    module: nn.Module,
    tensor_name: str,
    device: DeviceLike,
    value: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    *,
    missing: Missing = "error",
    init_fn: InitFn | None = None,
) -> None:
    """Put ``module``'s parameter or buffer ``tensor_name`` on ``device``.

    With ``value``, the tensor takes that data (shape checked, floats cast to ``dtype`` or the
    existing dtype). Without ``value``, a real tensor moves; a ``meta`` tensor follows ``missing``:
    ``"error"`` raises :class:`MetaTensorError`, ``"init"`` runs the owning module's own
    initialisation on the target device, ``"zeros"`` fills zeros. Never uninitialised memory.
    ``dtype`` (a torch dtype or its name) applies to float tensors only and must be a float dtype.
    """
    check_policy(missing)
    target = parse_target(device)
    dtype = parse_dtype(dtype)
    slot = find_slot(module, tensor_name)
    old = slot.tensor
    _check_cast(tensor_name, old if value is None else value, dtype)
    if value is not None:
        if tuple(value.shape) != tuple(old.shape):
            raise ShapeMismatchError(
                f"{tensor_name!r}: the value has shape {tuple(value.shape)} but "
                f"{type(slot.owner).__name__} expects {tuple(old.shape)}"
            )
        if value.device.type == "meta" and target.type != "meta":
            raise MetaTensorError(f"{tensor_name!r}: the value given is itself on 'meta'")
        replace_tensor(slot, cast_like(value, old, dtype).to(target), root=module)
    elif old.device.type == "meta" and target.type != "meta":
        materialize_slots(module, [slot], target, missing, dtype, init_fn)
    else:
        new = old.to(target, dtype=dtype) if dtype is not None and old.is_floating_point() else (
            old.to(target)
        )
        replace_tensor(slot, new, root=module)


def replace_tensor(
    slot: TensorSlot,
    new: torch.Tensor,
    *,
    root: nn.Module | None = None,
    swap: bool | None = None,
) -> None:
    """Make ``slot`` hold ``new``'s data, keeping the parameter's identity (and so its ties).

    ``root`` is the model the slot belongs to: when the tensor cannot keep its identity, every
    alias under ``root`` (default: the owning module) is pointed at the new tensor instead.
    Emptying a real tensor (``new`` on meta) gives the slot a new object unless ``swap=True``,
    so that other references to the old tensor keep its data. ``new`` is always detached, so
    the slot never holds the caller's own tensor object or an autograd history.
    """
    old = slot.tensor
    if new is old:
        return
    new = new.detach()
    replacement = rebuild_parameter(old, new) if slot.is_param else new
    emptying = new.device.type == "meta" and old.device.type != "meta"
    if swap is False or (swap is None and emptying):
        # emptying a slot must not empty other references to the old tensor (a stash of
        # `lin.weight`): the slot and its aliases get a new object instead of a swap
        _replace_aliases(slot, old, replacement, root or slot.owner)
        return
    try:
        torch.utils.swap_tensors(old, replacement)
    except RuntimeError:
        # swap_tensors refuses tensors with weakrefs or extra C++ references; replace every alias
        _replace_aliases(slot, old, replacement, root or slot.owner)


def _replace_aliases(
    slot: TensorSlot, old: torch.Tensor, new: torch.Tensor, root: nn.Module
) -> None:
    table_name = "_parameters" if slot.is_param else "_buffers"
    getattr(slot.owner, table_name)[slot.leaf] = new
    for module in root.modules():
        table = getattr(module, table_name)
        for key, value in table.items():
            if value is old:
                table[key] = new


def check_policy(missing: str) -> None:
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r}: use one of {', '.join(MISSING_POLICIES)}")


def default_init_fn(module: nn.Module) -> InitFn | None:
    """The module's own initialisation: ``reset_parameters()`` (or ``_reset_parameters()``)."""
    for name in ("reset_parameters", "_reset_parameters"):
        method = getattr(module, name, None)
        if callable(method):
            return lambda _m, _method=method: _method()
    return None


def materialize_slots(
    root: nn.Module,
    slots: list[TensorSlot],
    target: torch.device,
    missing: Missing,
    dtype: torch.dtype | None,
    init_fn: InitFn | None,
) -> None:
    """Give real data to meta ``slots`` under the policy; errors before anything changes."""
    problems = meta_problems(slots, missing, init_fn, target)
    if problems:
        raise problems
    if missing == "zeros":
        for slot in slots:
            old = slot.tensor
            zeros = torch.zeros(old.shape, dtype=_dtype_for(old, dtype), device=target)
            replace_tensor(slot, zeros, root=root)
        return
    by_owner: dict[int, list[TensorSlot]] = {}
    for slot in slots:
        by_owner.setdefault(id(slot.owner), []).append(slot)
    for group in by_owner.values():
        initialize_owned(group, target, dtype, init_fn, root=root)


def _dtype_for(old: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and old.is_floating_point() else old.dtype


def meta_problems(
    slots: list[TensorSlot], missing: str, init_fn: InitFn | None, target: torch.device
) -> BaseException | None:
    nonpersistent = [s for s in slots if not s.is_param and not s.persistent]
    if nonpersistent:
        return SkeletonError(
            f"{len(nonpersistent)} non-persistent buffer(s) are on 'meta'; no checkpoint can fill "
            "them and zeros would be wrong:\n"
            + format_problems([_describe(s) for s in nonpersistent])
            + "\nBuild the model inside bigload.init_empty_weights(), which keeps non-persistent "
            "buffers real (torch.device('meta') as a context does not)."
        )
    if missing == "error":
        return MetaTensorError(
            f"{len(slots)} tensor(s) are on 'meta' (no data) and no value was given for {target}:\n"
            + format_problems([_describe(s) for s in slots])
            + "\nLoad them from a checkpoint (bigload.load_checkpoint_in_model), pass value=..., "
            "or choose a policy: missing='init' runs the module's own initialisation, "
            "missing='zeros' fills zeros."
        )
    if missing == "init" and init_fn is None:
        lacking = [s for s in slots if default_init_fn(s.owner) is None]
        if lacking:
            return NoInitError(
                f"missing='init': {len(lacking)} tensor(s) belong to modules with no "
                "reset_parameters() of their own:\n"
                + format_problems([_describe(s) for s in lacking])
                + "\nGive the values from a checkpoint, pass init_fn=..., or use missing='zeros'."
            )
    return None


def _describe(slot: TensorSlot) -> str:
    kind = "parameter" if slot.is_param else (
        "buffer" if slot.persistent else "non-persistent buffer"
    )
    t = slot.tensor
    return (
        f"{slot.fqn!r:40} {kind} of {type(slot.owner).__name__}  "
        f"shape={tuple(t.shape)} dtype={str(t.dtype).removeprefix('torch.')}"
    )


def initialize_owned(
    slots: list[TensorSlot],
    target: torch.device,
    dtype: torch.dtype | None,
    init_fn: InitFn | None,
    *,
    root: nn.Module | None = None,
) -> None:
    """Initialise the meta tensors ``slots`` (all of one owning module) with the module's own
    initialisation on ``target``, leaving the module's other (already real) tensors untouched.

    The other tensors are swapped for meta placeholders while the initialisation runs, so in-place
    init on them is a no-op. Floats start as NaN: one left untouched by the init is an error, not
    garbage.
    """
    owner = slots[0].owner
    fn = init_fn or default_init_fn(owner)
    fresh = {s.leaf: _nan_like(s.tensor, target, dtype) for s in slots}
    for slot in slots:
        replace_tensor(slot, fresh[slot.leaf], root=root)
    versions = {leaf: t._version for leaf, t in _owned(owner) if leaf in fresh}
    parked = _park_others(owner, set(fresh))
    try:
        with torch.no_grad():
            fn(owner)
    finally:
        _unpark(parked)
    untouched = [
        s.fqn for s in slots if not _was_initialised(s.tensor, versions.get(s.leaf))
    ]
    if untouched:
        raise NoInitError(
            f"the initialisation of {type(owner).__name__} left {', '.join(map(repr, untouched))} "
            "unset; pass missing='zeros' or give the values from a checkpoint"
        )


def _owned(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from ((k, v) for k, v in module._parameters.items() if v is not None)
    yield from ((k, v) for k, v in module._buffers.items() if v is not None)


def _nan_like(old: torch.Tensor, target: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    dt = _dtype_for(old, dtype)
    if dt.is_floating_point or dt.is_complex:
        return torch.full(old.shape, float("nan"), dtype=dt, device=target)
    return torch.zeros(old.shape, dtype=dt, device=target)


def _was_initialised(tensor: torch.Tensor, version_before: int | None) -> bool:
    if tensor.is_floating_point() and tensor.numel() and torch.isnan(tensor).any():
        return False
    if tensor.is_floating_point() or version_before is None:
        return True
    return tensor._version != version_before


def _park_others(owner: nn.Module, keep: set[str]) -> list[tuple[dict, str, torch.Tensor]]:
    """Swap every real tensor under ``owner`` except ``keep`` (direct leaves) for a meta twin."""
    parked = []
    for module in owner.modules():
        for table in (module._parameters, module._buffers):
            for leaf, t in list(table.items()):
                if t is None or t.device.type == "meta" or (module is owner and leaf in keep):
                    continue
                twin = t.to("meta")
                table[leaf] = rebuild_parameter(t, twin) if isinstance(t, nn.Parameter) else twin
                parked.append((table, leaf, t))
    return parked


def _unpark(parked: list[tuple[dict, str, torch.Tensor]]) -> None:
    for table, leaf, t in parked:
        table[leaf] = t


def materialize(
    model: nn.Module,
    device: DeviceLike,
    *,
    missing: Missing = "error",
    dtype: torch.dtype | None = None,
    init_fn: InitFn | None = None,
) -> nn.Module:
    """What ``model.to(device)`` should be for a model that may hold meta tensors.

    Real tensors move; meta tensors follow ``missing``. Every problem is collected and raised
    once, before anything is changed. Ties stay ties. Returns ``model``. ``dtype`` (float dtypes
    only) applies to float tensors.
    """
    check_policy(missing)
    target = parse_target(device)
    dtype = parse_dtype(dtype, floating=True)
    metas: list[TensorSlot] = []
    reals: list[TensorSlot] = []
    for slot in unique_slots(model):
        is_meta = slot.tensor.device.type == "meta" and target.type != "meta"
        (metas if is_meta else reals).append(slot)
    if metas:
        problems = meta_problems(metas, missing, init_fn, target)
        if problems:
            raise problems
    for slot in reals:
        old = slot.tensor
        new = old.to(target, dtype=_dtype_for(old, dtype))
        replace_tensor(slot, new, root=model)
    if metas:
        materialize_slots(model, metas, target, missing, dtype, init_fn)
    return model
