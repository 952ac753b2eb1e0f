"""Fast meta shadows. torch runs most ops on ``meta`` through Python reference kernels (hundreds
of microseconds each), which would make another rank's unit cost more here than its real compute
costs there. While a shadow runs, a torch call seen before with the same input shapes returns
empty meta tensors of the shapes it gave then (a dictionary lookup), and the two calls whose
shapes change at every decoding step (a KV cache grows) have their shapes computed directly:
``torch.cat`` and ``scaled_dot_product_attention``. The module's own code still runs, so a
shadow's effects (a KV cache's entries) are those of the real forward."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_MAX_ENTRIES = 1 << 16
# calls that return Python values or alias their input: run as they are
_NOT_CACHED = frozenset({"__setitem__", "__getitem__", "size", "dim", "numel", "stride",
                         "__get__", "__len__", "__iter__", "data_ptr", "storage_offset",
                         "is_contiguous", "element_size", "untyped_storage", "__bool__",
                         "item", "tolist"})


class FastMeta(TorchFunctionMode):
    """Torch calls on meta tensors, answered from the shapes they gave before where they can
    be, and computed directly for the calls a growing KV cache changes at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[tuple, Any] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is not None:
            found = rule(args, kwargs)
            if found is not None:
                return found
        name = getattr(func, "__name__", "")
        if name in _NOT_CACHED or (name.endswith("_") and not name.endswith("__")) or (
                "out" in kwargs):
            return func(*args, **kwargs)
        try:
            key = (func, _key(args), _key(sorted(kwargs.items())))
            known = self.shapes.get(key)
        except TypeError:  # an argument that cannot be a key
            return func(*args, **kwargs)
        if known is not None:
            return _empty(known) if isinstance(known[2], torch.dtype) else tuple(
                _empty(k) for k in known)
        out = func(*args, **kwargs)
        if len(self.shapes) < _MAX_ENTRIES and _only_meta(args, kwargs):
            if type(out) is torch.Tensor and out.device.type == "meta":
                self.shapes[key] = (tuple(out.shape), out.stride(), out.dtype)
            elif type(out) is tuple and out and all(
                    type(o) is torch.Tensor and o.device.type == "meta" for o in out):
                self.shapes[key] = tuple((tuple(o.shape), o.stride(), o.dtype) for o in out)
        return out


def _key(values: Any) -> tuple:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append((tuple(v.shape), v.stride(), v.dtype, v.device.type))
        elif isinstance(v, (list, tuple)):
            out.append(_key(v))
        else:
            hash(v)
            out.append(v)
    return tuple(out)


def _empty(spec: tuple) -> torch.Tensor:
    shape, stride, dtype = spec
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def _only_meta(args: tuple, kwargs: dict) -> bool:
    """Every tensor argument is on meta (a shadow's own): the result is shapes only."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            return False
        if isinstance(value, (list, tuple)) and any(
                isinstance(v, torch.Tensor) and v.device.type != "meta" for v in value):
            return False
    return True


def _meta(*values: Any) -> bool:
    return all(v.device.type == "meta" for v in values if isinstance(v, torch.Tensor))


def _cat_rule(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if "out" in kwargs:
        return None
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None
    parts = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)]  # torch skips []
    if not parts or not _meta(*tensors) or any(t.ndim != parts[0].ndim for t in parts):
        return None
    dim = dim % parts[0].ndim
    shape = list(parts[0].shape)
    if any(list(t.shape[:dim]) + list(t.shape[dim + 1:]) != shape[:dim] + shape[dim + 1:]
           for t in parts):
        return None
    shape[dim] = sum(t.shape[dim] for t in parts)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.empty(shape, dtype=dtype, device="meta")


def _sdpa_rule(args: tuple, kwargs: dict) -> torch.Tensor | None:
    query = args[0] if args else kwargs.get("query")
    value = args[2] if len(args) > 2 else kwargs.get("value")
    key = args[1] if len(args) > 1 else kwargs.get("key")
    if query is None or value is None or not _meta(query, key, value):
        return None
    return torch.empty((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device="meta")


_RULES = {torch.cat: _cat_rule, torch.concat: _cat_rule, torch.concatenate: _cat_rule,
          F.scaled_dot_product_attention: _sdpa_rule}
