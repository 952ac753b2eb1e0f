"""accelerate's ``load_checkpoint_in_model`` and ``load_checkpoint_and_dispatch`` as the stages'
composition, and the one piece of state the edge keeps: the store a load filled, remembered for
the model (``STORES``, a weak mapping) until accelerate's separate ``dispatch_model`` call."""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...checkpoint import CheckpointIndex, read_index
from ...errors import UnsupportedArgumentError
from ...loader import LoadOptions, load_weights
from ...offload import OffloadStore
from ...plan import STRATEGIES, DevicePlan, merge_prefixes, plan_devices, plan_from_device_map
from ...preflight import Unexpected, verify
from ...report import LoadReport
from ...runtime import dispatch, state_of
from ...slots import iter_slots
from ...tensors import InitFn, Missing

STORES: weakref.WeakKeyDictionary[nn.Module, OffloadStore] = weakref.WeakKeyDictionary()


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
    plan = plan_for(model, device_map, index, dtype=dtype, offload_buffers=offload_buffers,
                     keep_in_fp32_modules=keep_in_fp32_modules)
    options = _options(dtype, keep_in_fp32_modules, missing, unexpected, strict, key_map,
                       offload_folder, progress, init_fn)
    loaded = load_weights(model, index, plan, options)
    remember_store(model, loaded.store)
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
    plan = plan_for(model, device_map, index, dtype=dtype, max_memory=max_memory,
                     no_split_module_classes=no_split_module_classes,
                     offload_buffers=offload_buffers, keep_in_fp32_modules=keep_in_fp32_modules,
                     preload_module_classes=preload_module_classes, prefetch=prefetch,
                     headroom_bytes=headroom_bytes)
    report = verify(model, index, key_map=options.key_map, plan=plan)
    loaded = load_weights(model, index, plan, options, verified=report)
    remember_store(model, loaded.store)
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


def plan_for(
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


def remember_store(model: nn.Module, store: OffloadStore) -> None:
    known = STORES.get(model)
    if known is None:
        STORES[model] = store
    else:
        known.merge(store)


def known_store(model: nn.Module) -> OffloadStore:
    """The store a load or a dispatch of ``model`` filled, else a new one."""
    known = STORES.get(model)
    if known is None:
        state = state_of(model)
        known = state.store if state is not None else OffloadStore()
    return known


def _describe(model: nn.Module, plan: DevicePlan, report: LoadReport) -> None:
    for name, value in (("bigload_plan", plan), ("bigload_report", report)):
        object.__setattr__(model, name, value)


