"""accelerate's ``dispatch_model``, ``cpu_offload``, ``disk_offload`` and
``cpu_offload_with_hook``: a map (or one device) becomes a plan, the model is placed and the
hooks attached; the store of an earlier ``load_checkpoint_in_model`` is used."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...devices import DeviceLike, accelerator_type, parse_device
from ...offload.accelerate_folder import serve_accelerate_folder
from ...place import place_weights
from ...runtime import dispatch, send_to_device
from ...slots import iter_slots, unique_slots
from ...tensors import materialize, replace_tensor
from ...tensors import set_module_tensor_to_device as _set_tensor
from .loading import known_store, plan_for, remember_store


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
    plan = plan_for(model, device_map, None, offload_buffers=offload_buffers,
                     preload_module_classes=preload_module_classes, prefetch=prefetch,
                     main_device=main_device)
    if state_dict:
        _fill_from_state_dict(model, state_dict)
    store = known_store(model)
    if offload_index:
        store.merge(serve_accelerate_folder(model, offload_dir, offload_index))
    place_weights(model, plan, store=store, offload_folder=offload_dir)
    remember_store(model, store)
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
    device = _execution_device(execution_device)
    materialize(model, "cpu")
    return model, UserCpuOffloadHook(model, device, prev_module_hook)


