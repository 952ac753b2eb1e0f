"""Moving activations between devices (nested outputs, dataclasses, model outputs), and keeping a
dispatched model from being moved or cast wholesale by ``.to()``/``.half()``/``.cuda()``."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..devices import parse_device


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


def first_device(obj: Any) -> torch.device | None:
    """The device of the first tensor found in ``obj`` (nested), or None."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for value in obj:
            found = first_device(value)
            if found is not None:
                return found
    return None


CASTS = {"half": torch.float16, "float": torch.float32, "double": torch.float64,
         "bfloat16": torch.bfloat16}
GUARDED = ("to", "cpu", "cuda", "xpu", "_apply", *CASTS)

Check = Callable[[nn.Module, Any, "torch.dtype | None", str], nn.Module]


def guard_moves(model: nn.Module, check: Check, runs_on: torch.device) -> None:
    """Route ``model.to()``, ``cpu()``, ``cuda()``, ``xpu()``, ``half()``... through ``check``
    (model, device or None, dtype or None, the call as text), and ``_apply`` too: a parent's
    ``.to()`` reaches its children through it. ``runs_on`` is where the model runs."""

    def to(m: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _non_blocking, _fmt = torch._C._nn._parse_to(*args, **kwargs)
        return check(m, device, dtype, f".to({', '.join(map(str, args))})")

    model.__dict__["to"] = types.MethodType(to, model)
    for name, dtype in CASTS.items():
        model.__dict__[name] = types.MethodType(
            lambda m, _d=dtype, _n=name: check(m, None, _d, f".{_n}()"), model)
    for kind in ("cuda", "xpu"):
        model.__dict__[kind] = types.MethodType(
            lambda m, device=None, _k=kind, **_kw: check(m, _accelerator(_k, device), None,
                                                         f".{_k}()"), model)
    model.__dict__["cpu"] = types.MethodType(lambda m: check(m, "cpu", None, ".cpu()"), model)

    def _apply(m: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
        dtype = next((p.dtype for p in m.parameters() if p.is_floating_point()), torch.float32)
        probe = torch.empty(0, dtype=dtype, device=runs_on)
        moved = fn(probe)  # what the parent's .to()/.half() would do to a tensor here
        device = None if moved.device == probe.device else moved.device
        return check(m, device, None if moved.dtype == dtype else moved.dtype,
                     "a parent module's .to()")

    model.__dict__["_apply"] = types.MethodType(_apply, model)


def unguard_moves(model: nn.Module) -> None:
    for name in GUARDED:
        model.__dict__.pop(name, None)


def _accelerator(kind: str, device: Any) -> torch.device:
    if isinstance(device, (str, torch.device)):
        return parse_device(device, check_available=False)
    return torch.device(kind, device if isinstance(device, int) else 0)
