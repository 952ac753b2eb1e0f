"""accelerate's big-model API on top of bigload's stages: the names, positional orders, integer
device keys and arguments users of accelerate write, translated into plans and options once.

This module is the only place that keeps state between two calls: accelerate loads with
``load_checkpoint_in_model`` and dispatches later with ``dispatch_model``, so the store of
offloaded tensors a load filled is remembered for the model in ``_STORES`` (a weak mapping: it
goes with the model) and handed to ``dispatch_model``. Differences from accelerate, by design,
are listed in docs/accelerate.md (never a meta tensor left behind; budgets are kept).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointIndex, read_index
from ..devices import DISK, DeviceLike, accelerator_type, parse_device, parse_max_memory
from ..errors import BigloadError, UnsupportedArgumentError
from ..loader import LoadOptions, load_weights, place_weights
from ..offload import OffloadStore
from ..plan import (
    STRATEGIES,
    DevicePlan,
    check_covers,
    merge_prefixes,
    plan_devices,
    plan_from_device_map,
    read_budgets,
    tier_key,
)
from ..plan.budgets import CPU_FRACTION, balanced_targets, detected_budgets
from ..plan.units import no_split_rule, plan_units
from ..preflight import Unexpected, verify
from ..report import LoadReport
from ..runtime import dispatch, state_of
from ..sizes import DtypeLike, tensor_sizes
from ..slots import find_slot, iter_slots
from ..tensors import InitFn, Missing, parse_target, replace_tensor
from ..tensors import set_module_tensor_to_device as _set_tensor

logger = logging.getLogger(__name__)

_STORES: weakref.WeakKeyDictionary[nn.Module, OffloadStore] = weakref.WeakKeyDictionary()


# --- tensors -----------------------------------------------------------------------------------
def set_module_tensor_to_device(
    module: nn.Module,
    tensor_name: str,
    device: DeviceLike,
    value: torch.Tensor | None = None,
    dtype: torch.dtype | str | None = None,
    fp16_statistics: torch.Tensor | None = None,
    tied_params_map: dict[int, dict[torch.device, torch.Tensor]] | None = None,
    non_blocking: bool = False,
    clear_cache: bool = True,
    *,
    missing: Missing = "error",
    init_fn: InitFn | None = None,
) -> None:
    """accelerate's signature over :func:`bigload.tensors.set_module_tensor_to_device` (a meta
    tensor without ``value`` follows ``missing``; never uninitialised memory).

    ``tied_params_map`` ({data_ptr: {device: tensor}}) is honoured: a value already moved to
    ``device`` for a tied twin is reused, and a new copy is recorded. ``fp16_statistics`` is set
    as the parameter's ``SCB`` (bitsandbytes' int8 statistics). ``non_blocking`` is passed to the
    copy; ``clear_cache`` is accepted (bigload never empties the allocator cache per tensor).
    """
    del clear_cache
    target = parse_target(device)
    source = value if value is not None else find_slot(module, tensor_name).tensor
    reused = _tied_copy(tied_params_map, source, target)
    if reused is not None:
        replace_tensor(find_slot(module, tensor_name), reused, root=module)
    elif non_blocking and value is not None and target.type != "meta":
        _set_tensor(module, tensor_name, target, value.to(target, non_blocking=True), dtype,
                    missing=missing, init_fn=init_fn)
    else:
        _set_tensor(module, tensor_name, target, value, dtype, missing=missing, init_fn=init_fn)
    slot = find_slot(module, tensor_name)
    _remember_tied_copy(tied_params_map, source, target, slot.tensor)
    if fp16_statistics is not None:
        slot.tensor.SCB = fp16_statistics.to(target)  # type: ignore[attr-defined]


def _tied_copy(
    tied: Mapping[int, Mapping[torch.device, torch.Tensor]] | None, source: torch.Tensor,
    target: torch.device,
) -> torch.Tensor | None:
    if tied is None or source.device.type == "meta":
        return None
    return tied.get(source.data_ptr(), {}).get(target)


def _remember_tied_copy(
    tied: dict[int, dict[torch.device, torch.Tensor]] | None, source: torch.Tensor,
    target: torch.device, placed: torch.Tensor,
) -> None:
    if tied is not None and source.device.type != "meta" and source.data_ptr() in tied:
        tied[source.data_ptr()].setdefault(target, placed)


# --- budgets and maps --------------------------------------------------------------------------
def _accelerate_key(placement: str) -> int | str:
    if placement in ("cpu", DISK):
        return placement
    device = torch.device(placement)
    return "mps" if device.type == "mps" else device.index  # type: ignore[return-value]


def get_max_memory(
    max_memory: Mapping[DeviceLike, int | str] | None = None,
) -> dict[int | str, int]:
    """accelerate's: free memory per accelerator (int keys) and available RAM ("cpu"), or the
    given budgets in bytes, ordered accelerators → "mps" → "cpu" → "disk"."""
    if max_memory is None:
        found = {p: b for p, b in detected_budgets(1.0)[0].items() if b is not None}
    else:
        found = {str(p) if not isinstance(p, str) else p: b
                 for p, b in parse_max_memory(max_memory).items()}
    ordered = sorted(found.items(), key=lambda item: tier_key(item[0]))
    return {_accelerate_key(p): b for p, b in ordered}


def get_balanced_memory(
    model: nn.Module,
    max_memory: Mapping[DeviceLike, int | str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    low_zero: bool = False,
) -> dict[int | str, int]:
    """accelerate's: a ``max_memory`` whose accelerators (all but the last) share the model."""
    budgets = read_budgets(get_max_memory(max_memory))
    entries = tensor_sizes(model, dtype=dtype, special_dtypes=special_dtypes)
    rule, _notes = no_split_rule(model, no_split_module_classes or [], entries)
    units = plan_units(model, entries, rule)
    largest_whole = max((u.size_bytes for u in units if u.whole), default=0)
    strategy = "balanced_low_0" if low_zero else "balanced"
    targets = balanced_targets(strategy, budgets, [u.size_bytes for u in units], largest_whole)
    accels = budgets.accelerators()
    if max_memory is None and len(accels) == 1:  # as accelerate: keep 10% of a lone GPU free
        targets[accels[0]] = int(0.9 * budgets.limits[accels[0]])  # type: ignore[operator]
    return {_accelerate_key(p): targets.get(p, b)  # type: ignore[misc]
            for p, b in budgets.limits.items() if b is not None}


def infer_auto_device_map(
    model: nn.Module,
    max_memory: Mapping[DeviceLike, int | str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
) -> dict[str, int | str]:
    """accelerate's: {fqn: int (accelerator index) | "mps" | "cpu" | "disk"}, filled in order.

    As accelerate, modules split down to leaves unless ``no_split_module_classes`` names them.
    ``fallback_allocation`` is accepted: bigload's planner already places any unit that fits
    on a device, whatever comes before it."""
    del fallback_allocation
    overrides = None
    if special_dtypes:
        entries = tensor_sizes(model, dtype=dtype, special_dtypes=special_dtypes)
        overrides = {e.fqns[0]: e.size_bytes for e in entries}
    plan = plan_devices(
        model, max_memory=get_max_memory(max_memory), strategy="sequential",
        no_split_module_classes=no_split_module_classes or [], dtype=dtype,
        offload_buffers=offload_buffers, headroom_bytes=0, tensor_sizes=overrides, prefetch=0,
    )
    if verbose:
        logger.info("%s", plan)
    result = {u.name: _accelerate_key(u.placement) for u in plan.units}
    return clean_device_map(result) if clean_result else result


def clean_device_map(device_map: dict[str, Any], module_name: str = "") -> dict[str, Any]:
    """Merge the keys under each module that all map to one device into the module's key.

    Changes ``device_map`` in place (and returns it), as accelerate's does.
    """
    merged = merge_prefixes(device_map, module_name)
    device_map.clear()
    device_map.update(merged)
    return device_map


def check_device_map(model: nn.Module, device_map: Mapping[str, Any]) -> None:
    """Raise DeviceMapError naming every tensor the map gives no device or a bad value; keys
    that match nothing in the model are a warning (as accelerate)."""
    from ..devicemap import normalize_device_map

    normalize_device_map(dict(device_map), check_available=False)
    check_covers(model, device_map, unknown="warn")


# --- loading -----------------------------------------------------------------------------------
def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: str | os.PathLike | CheckpointIndex,
    device_map: Any = None,
    offload_folder: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    offload_state_dict: bool = False,
    offload_buffers: bool = False,
    keep_in_fp32_modules: Sequence[str] | None = None,
    offload_8bit_bnb: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
    *,
    missing: Missing | None = None,
    unexpected: Unexpected | None = None,
    key_map: Mapping[str, str] | None = None,
    progress: bool | None = None,
    init_fn: InitFn | None = None,
) -> LoadReport:
    """accelerate's signature: load ``checkpoint`` into ``model`` where ``device_map`` says
    (None: where each tensor is, meta ones on the CPU) and return the LoadReport.

    ``strict=True`` is ``missing="error", unexpected="error"``; missing tensors are an error by
    default either way (a tensor is never left on meta). ``offload_state_dict`` is accepted
    (bigload streams tensor by tensor anyway). The offloaded tensors are remembered for a later
    :func:`dispatch_model` of the same model.
    """
    del offload_state_dict
    _refuse(offload_8bit_bnb=offload_8bit_bnb, full_state_dict=full_state_dict,
            broadcast_from_rank0=broadcast_from_rank0)
    index = _index(checkpoint)
    plan = _plan_for(model, device_map, index, dtype=dtype, offload_buffers=offload_buffers,
                     keep_in_fp32_modules=keep_in_fp32_modules)
    options = _options(dtype, keep_in_fp32_modules, missing, unexpected, strict, key_map,
                       offload_folder, progress, init_fn)
    loaded = load_weights(model, index, plan, options)
    _remember(model, loaded.store)
    return loaded.report


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike | CheckpointIndex,
    device_map: Any = None,
    max_memory: Mapping[Any, int | str] | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    offload_buffers: bool = False,
    dtype: torch.dtype | str | None = None,
    offload_state_dict: bool | None = None,
    skip_keys: str | Sequence[str] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    force_hooks: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
    *,
    keep_in_fp32_modules: Sequence[str] | None = None,
    missing: Missing | None = None,
    unexpected: Unexpected | None = None,
    key_map: Mapping[str, str] | None = None,
    progress: bool | None = None,
    init_fn: InitFn | None = None,
    prefetch: int | None = None,
    headroom_bytes: int | str | None = None,
) -> nn.Module:
    """Plan (``device_map="auto"|"balanced"|"balanced_low_0"|"sequential"``, a dict, a device
    or a DevicePlan), verify, load and dispatch, with accelerate's argument names. Returns
    ``model``; ``model.bigload_plan`` and ``model.bigload_report`` hold the plan and report.
    """
    del offload_state_dict
    _refuse(full_state_dict=full_state_dict, broadcast_from_rank0=broadcast_from_rank0)
    options = _options(dtype, keep_in_fp32_modules, missing, unexpected, strict, key_map,
                       offload_folder, progress, init_fn)
    index = _index(checkpoint)
    plan = _plan_for(model, device_map, index, dtype=dtype, max_memory=max_memory,
                     no_split_module_classes=no_split_module_classes,
                     offload_buffers=offload_buffers, keep_in_fp32_modules=keep_in_fp32_modules,
                     preload_module_classes=preload_module_classes, prefetch=prefetch,
                     headroom_bytes=headroom_bytes)
    report = verify(model, index, key_map=options.key_map, plan=plan)
    loaded = load_weights(model, index, plan, options, verified=report)
    _remember(model, loaded.store)
    if device_map is not None:
        dispatch(model, plan, loaded.store, skip_keys=skip_keys, force_hooks=force_hooks)
    _describe(model, plan, loaded.report)
    return model


def _options(dtype, keep_fp32, missing, unexpected, strict, key_map, folder, progress,  # noqa: ANN001
             init_fn) -> LoadOptions:
    return LoadOptions(
        dtype=dtype, keep_in_fp32_modules=keep_fp32, missing=missing or "error",
        unexpected=unexpected or ("error" if strict else "warn"), key_map=key_map,
        offload_folder=folder, progress=progress, init_fn=init_fn,
    )


def _index(checkpoint: Any) -> CheckpointIndex:
    """A checkpoint path (a file, a folder, an index JSON) or an index already read."""
    if isinstance(checkpoint, CheckpointIndex):
        return checkpoint
    return read_index(checkpoint)


def _plan_for(
    model: nn.Module, device_map: Any, index: CheckpointIndex | None, *,
    dtype: Any = None, max_memory: Any = None, no_split_module_classes: Any = None,
    offload_buffers: bool = False, keep_in_fp32_modules: Any = None,
    preload_module_classes: Any = None, prefetch: int | None = None,
    headroom_bytes: Any = None, main_device: Any = None,
) -> DevicePlan:
    """Every way accelerate says where tensors go, as a plan: a strategy name, a dict, one
    device, None (where the tensors are, meta ones on the CPU), or a plan already made."""
    if isinstance(device_map, DevicePlan):
        return device_map
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return plan_devices(
            model, max_memory=max_memory, strategy=device_map,  # type: ignore[arg-type]
            no_split_module_classes=no_split_module_classes, dtype=dtype,
            offload_buffers=offload_buffers, keep_in_fp32_modules=keep_in_fp32_modules,
            index=index, prefetch=prefetch, headroom_bytes=headroom_bytes,
            preload_module_classes=preload_module_classes)
    return plan_from_device_map(
        model, _where_tensors_are(model) if device_map is None else device_map,
        main_device=main_device, prefetch=prefetch, dtype=dtype,
        no_split_module_classes=no_split_module_classes, offload_buffers=offload_buffers,
        preload_module_classes=preload_module_classes)


def _where_tensors_are(model: nn.Module) -> dict[str, str]:
    placed = {s.fqn: "cpu" if s.tensor.device.type == "meta" else str(s.tensor.device)
              for s in iter_slots(model)}
    return merge_prefixes(placed) if placed else {"": "cpu"}


def _refuse(**flags: bool) -> None:
    """Arguments accepted for accelerate's signature whose behaviour bigload does not offer."""
    why = {
        "offload_8bit_bnb": "bitsandbytes 8-bit weights are not supported by bigload; load "
                            "them with accelerate or transformers' BitsAndBytesConfig",
        "full_state_dict": "full_state_dict=False (sharded FSDP state dicts) is not supported: "
                           "bigload reads full checkpoints, each rank only its own tensors",
        "broadcast_from_rank0": "broadcast_from_rank0=True is not needed with bigload: every "
                                "rank reads only its own tensors from the checkpoint",
    }
    for name, value in flags.items():
        if value != (name == "full_state_dict"):
            raise UnsupportedArgumentError(f"{name}={value!r}: {why[name]}.")


def _remember(model: nn.Module, store: OffloadStore) -> None:
    known = _STORES.get(model)
    if known is None:
        _STORES[model] = store
    else:
        known.merge(store)


def _known_store(model: nn.Module) -> OffloadStore:
    """The store a load or a dispatch of ``model`` filled, else a new one."""
    known = _STORES.get(model)
    if known is None:
        state = state_of(model)
        known = state.store if state is not None else OffloadStore()
    return known


def _describe(model: nn.Module, plan: DevicePlan, report: LoadReport) -> None:
    for name, value in (("bigload_plan", plan), ("bigload_report", report)):
        object.__setattr__(model, name, value)


# --- dispatch ----------------------------------------------------------------------------------
def dispatch_model(
    model: nn.Module,
    device_map: Any,
    main_device: DeviceLike | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    offload_dir: str | os.PathLike | None = None,
    offload_index: Mapping[str, Any] | None = None,
    offload_buffers: bool = False,
    skip_keys: str | Sequence[str] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    force_hooks: bool = False,
    *,
    prefetch: int | None = None,
) -> nn.Module:
    """accelerate's signature: place ``model`` by ``device_map`` (a dict, one device, or a
    DevicePlan) and attach the hooks that run it there. Returns ``model``.

    Tensors still on meta are an error listing them, unless ``state_dict`` gives their values
    or a previous :func:`load_checkpoint_in_model` of this model serves them. Disk-placed
    tensors held in memory are written once to ``offload_dir``; an ``offload_index`` (accelerate's
    offload folder) serves its tensors from ``offload_dir`` as they are.
    """
    plan = _plan_for(model, device_map, None, offload_buffers=offload_buffers,
                     preload_module_classes=preload_module_classes, prefetch=prefetch,
                     main_device=main_device)
    if state_dict:
        _fill_from_state_dict(model, state_dict)
    store = _known_store(model)
    if offload_index:
        from ..offload.accelerate_folder import serve_accelerate_folder

        store.merge(serve_accelerate_folder(model, offload_dir, offload_index))
    place_weights(model, plan, store=store, offload_folder=offload_dir)
    _remember(model, store)
    return dispatch(model, plan, store, skip_keys=skip_keys, force_hooks=force_hooks)


def _fill_from_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    for slot in iter_slots(model):
        value = state_dict.get(slot.fqn)
        if value is not None and slot.tensor.device.type == "meta":
            _set_tensor(model, slot.fqn, value.device, value)


def _execution_device(execution_device: DeviceLike | None) -> torch.device:
    """accelerate's default: the first accelerator of this machine, else the CPU."""
    if execution_device is not None:
        return parse_device(execution_device)
    kind = accelerator_type()
    return torch.device(kind, 0) if kind else torch.device("cpu")


def cpu_offload(
    model: nn.Module,
    execution_device: DeviceLike | None = None,
    offload_buffers: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    *,
    prefetch: int | None = None,
) -> nn.Module:
    """Keep every weight in CPU memory and run each block on ``execution_device`` (default: the
    first accelerator, else the CPU)."""
    return dispatch_model(model, {"": "cpu"}, main_device=_execution_device(execution_device),
                          state_dict=state_dict, offload_buffers=offload_buffers,
                          preload_module_classes=preload_module_classes, prefetch=prefetch,
                          force_hooks=True)


def disk_offload(
    model: nn.Module,
    offload_dir: str | os.PathLike,
    execution_device: DeviceLike | None = None,
    offload_buffers: bool = False,
    preload_module_classes: Sequence[str] | None = None,
    *,
    prefetch: int | None = None,
) -> nn.Module:
    """Serve every weight from ``offload_dir`` (written once into a pack there; weights a pack
    already holds are reused) and run each block on ``execution_device``; buffers stay in
    memory unless ``offload_buffers``."""
    return dispatch_model(model, {"": "disk"}, main_device=_execution_device(execution_device),
                          offload_dir=offload_dir, offload_buffers=offload_buffers,
                          preload_module_classes=preload_module_classes, prefetch=prefetch)


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
        from ..runtime import send_to_device

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


def _move_all(model: nn.Module, device: torch.device) -> None:
    from ..slots import unique_slots

    for slot in unique_slots(model):
        if slot.tensor.device != device:
            replace_tensor(slot, slot.tensor.to(device, non_blocking=True))


def cpu_offload_with_hook(
    model: nn.Module,
    execution_device: DeviceLike | None = None,
    prev_module_hook: UserCpuOffloadHook | None = None,
) -> tuple[nn.Module, UserCpuOffloadHook]:
    """Whole-model offload for chains of models (diffusion pipelines): the model moves to
    ``execution_device`` when it runs and stays there until ``hook.offload()``; running it first
    offloads ``prev_module_hook``'s model."""
    from ..tensors import materialize

    device = _execution_device(execution_device)
    materialize(model, "cpu")
    return model, UserCpuOffloadHook(model, device, prev_module_hook)


__all__ = [
    "BigloadError",
    "CPU_FRACTION",
    "UserCpuOffloadHook",
    "check_device_map",
    "clean_device_map",
    "cpu_offload",
    "cpu_offload_with_hook",
    "disk_offload",
    "dispatch_model",
    "get_balanced_memory",
    "get_max_memory",
    "infer_auto_device_map",
    "load_checkpoint_and_dispatch",
    "load_checkpoint_in_model",
    "set_module_tensor_to_device",
]
