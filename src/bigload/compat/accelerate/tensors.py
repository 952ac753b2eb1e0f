"""accelerate's ``set_module_tensor_to_device``: its signature over bigload's, with the tied
parameters map honoured."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ...devices import DeviceLike
from ...slots import find_slot
from ...tensors import InitFn, Missing, parse_target, replace_tensor
from ...tensors import set_module_tensor_to_device as _set_tensor


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


