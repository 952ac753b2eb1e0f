"""Fast meta shadows. torch runs most ops on ``meta`` through Python reference kernels (hundreds
of microseconds each), which would make another rank's unit cost more here than its real compute
costs there. While a shadow runs, a torch call seen before with the same input shapes returns
empty meta tensors of the shapes it gave then (a dictionary lookup), and the two calls whose
shapes change at every decoding step (a KV cache grows) have their shapes computed directly:
``torch.cat`` and ``scaled_dot_product_attention``. The module's own code still runs, so a
shadow's effects (a KV cache's entries) are those of the real forward."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

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
            kind, specs = known
            return _empty(specs) if kind == "one" else tuple(_empty(k) for k in specs)
        out = func(*args, **kwargs)
        if len(self.shapes) < _MAX_ENTRIES and _only_meta(args, kwargs):
            if type(out) is torch.Tensor and out.device.type == "meta":
                self.shapes[key] = ("one", (tuple(out.shape), out.stride(), out.dtype))
            elif type(out) is tuple and out and all(
                    type(o) is torch.Tensor and o.device.type == "meta" for o in out):
                self.shapes[key] = ("many", tuple((tuple(o.shape), o.stride(), o.dtype)
                                                  for o in out))
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


def _nonzero_rule(args: tuple, kwargs: dict) -> Any:
    """Indices where a meta tensor is non-zero: none. A shadow needs shapes, not which tokens
    an expert takes; the output of a mixture of experts has its input's shape however the
    tokens are routed (and a loop over the experts hit runs no time)."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.device.type != "meta" or len(args) > 1:
        return None
    if kwargs.get("as_tuple"):
        return tuple(torch.empty(0, dtype=torch.long, device="meta") for _ in range(x.ndim))
    return torch.empty((0, x.ndim), dtype=torch.long, device="meta")


def _where_rule(args: tuple, kwargs: dict) -> Any:
    if len(args) != 1 or kwargs:  # torch.where(cond, a, b) has a shape: run it
        return None
    return _nonzero_rule(args, {"as_tuple": True})


def _grouped_mm_rule(args: tuple, kwargs: dict) -> Any:
    """(S, K) by (E, K, N) grouped by offsets → (S, N). torch's meta kernel for it insists on
    bfloat16 (the CUDA kernel's rule), where the CPU runs any float: computed here."""
    a = args[0] if args else kwargs.get("mat_a")
    b = args[1] if len(args) > 1 else kwargs.get("mat_b")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or not _meta(a, b):
        return None
    if a.ndim != 2 or b.ndim != 3:
        return None
    dtype = kwargs.get("out_dtype") or a.dtype
    return torch.empty((a.shape[0], b.shape[-1]), dtype=dtype, device="meta")


_GROUPED = [f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None))
            if f is not None]

_RULES = {torch.cat: _cat_rule, torch.concat: _cat_rule, torch.concatenate: _cat_rule,
          F.scaled_dot_product_attention: _sdpa_rule, torch.nonzero: _nonzero_rule,
          torch.Tensor.nonzero: _nonzero_rule, torch.argwhere: _nonzero_rule,
          torch.where: _where_rule, **dict.fromkeys(_GROUPED, _grouped_mm_rule)}


# --- whole shadows remembered ------------------------------------------------------------------
_PRIMITIVE = (bool, int, float, str, type(None), torch.dtype, torch.device)
_READS = frozenset({"get_seq_length", "get_mask_sizes", "get_max_cache_shape", "get_max_length",
                    "is_compileable", "is_sliding"})


@dataclass(frozen=True)
class _Remembered:
    output: tuple  # (pytree spec, leaves: tensor specs or primitives)
    calls: tuple  # what the forward asked of the caches it was given, in order


class RememberedShadow:
    """The ``forward`` of another rank's unit on this rank. A call whose inputs have the shapes
    (and primitive arguments, and cache flags) of an earlier one returns meta outputs of the
    shapes that one gave, and repeats on the KV cache what that one did to it (the same
    ``update`` calls, with meta tensors of the same shapes: the cache's own code runs, so its
    lengths are right). A call is remembered only when that is safe to repeat: its arguments
    are tensors, plain values and caches; it left the caches' flags as it found them; its
    outputs are new tensors; nothing inside the unit is hooked (transformers' output capture)."""

    def __init__(self, module: torch.nn.Module, forward: Any) -> None:
        self.module = module
        self.forward = forward
        self.remembered: dict[tuple, _Remembered | None] = {}
        self.inside = [m for m in module.modules() if m is not module]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = _call_key(spec, leaves)
        if key is None or any(m._forward_hooks or m._forward_pre_hooks for m in self.inside):
            return self.forward(*args, **kwargs)
        known = self.remembered.get(key)
        if known is not None:
            for call in known.calls:
                _repeat(call, leaves)
            out_spec, out_leaves = known.output
            return pytree.tree_unflatten([_make(v) for v in out_leaves], out_spec)
        caches = {k: v for k, v in enumerate(leaves) if _is_cache(v)}
        with _Recording(caches) as recording:
            out = self.forward(*args, **kwargs)
        if len(self.remembered) < _MAX_ENTRIES and recording.ok and _call_key(
                spec, leaves) == key:
            output = _output_spec(out, caches)
            self.remembered[key] = None if output is None else _Remembered(
                output, tuple(recording.calls))
        return out


def _is_cache(value: Any) -> bool:
    """A KV cache (transformers' Cache and its kind): it is updated and asked its length."""
    return callable(getattr(value, "update", None)) and callable(
        getattr(value, "get_seq_length", None)) and not isinstance(value, torch.Tensor)


def _flags(value: Any, depth: int = 0) -> tuple:
    """What of a cache's state decides what a forward does with it: its flags (bools, names,
    None), dicts of flags, its layers' flags and those of the caches it holds; not its lengths
    (they grow every step, and the cache's own code handles them)."""
    out = [type(value).__name__]
    for name, v in sorted(vars(value).items()):
        if isinstance(v, (bool, str, type(None))):
            out.append((name, v))
        elif isinstance(v, dict) and all(isinstance(x, (bool, type(None))) for x in v.values()):
            out.append((name, tuple(sorted(v.items(), key=repr))))
        elif depth < 2 and _is_cache(v):
            out.append((name, _flags(v, depth + 1)))
        elif depth < 2 and isinstance(v, (list, tuple)) and name == "layers":
            out.append((name, tuple(_flags(x, depth + 1) for x in v)))
    return tuple(out)


def _call_key(spec: Any, leaves: list) -> tuple | None:
    parts: list[Any] = [str(spec)]
    for v in leaves:
        if isinstance(v, torch.Tensor):
            if v.device.type != "meta":
                return None
            parts.append((tuple(v.shape), v.stride(), v.dtype))
        elif isinstance(v, _PRIMITIVE):
            parts.append(v)
        elif _is_cache(v):
            try:
                parts.append(_flags(v))
            except TypeError:  # no __dict__
                return None
        else:
            return None
    return tuple(parts)


def _spec_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype)
    if isinstance(value, _PRIMITIVE):
        return ("value", value)
    raise TypeError(type(value).__name__)


def _make(spec: Any) -> Any:
    if spec[0] == "tensor":
        return torch.empty_strided(spec[1], spec[2], dtype=spec[3], device="meta")
    return spec[1]


def _output_spec(out: Any, caches: dict[int, Any]) -> tuple | None:
    """The output as shapes, or None when it cannot be made again from them (a cache, or a
    tensor the cache holds: its shape grows)."""
    held = {id(t) for c in caches.values() for t in _cache_tensors(c)}
    leaves, spec = pytree.tree_flatten(out)
    try:
        if any(isinstance(v, torch.Tensor) and id(v) in held for v in leaves):
            return None
        return spec, tuple(_spec_of(v) for v in leaves)
    except TypeError:
        return None


def _cache_tensors(cache: Any, depth: int = 0) -> list[torch.Tensor]:
    found = []
    for v in vars(cache).values():
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif depth < 2 and (_is_cache(v) or hasattr(v, "__dict__")) and not isinstance(
                v, (type, torch.nn.Module)):
            found += _cache_tensors(v, depth + 1)
        elif depth < 2 and isinstance(v, (list, tuple)):
            for x in v:
                if hasattr(x, "__dict__"):
                    found += _cache_tensors(x, depth + 1)
    return found


class _Recording:
    """Records the methods a forward calls on the caches it was given (outermost calls only),
    as (leaf, attribute path, method, arguments as shapes), by wrapping them on the instances
    for the duration."""

    def __init__(self, caches: dict[int, Any]) -> None:
        self.caches = caches
        self.calls: list[tuple] = []
        self.ok = True
        self.patched: list[tuple[Any, str]] = []
        self.depth = 0

    def __enter__(self) -> _Recording:
        for leaf, cache in self.caches.items():
            self._patch(cache, leaf, ())
        return self

    def _patch(self, cache: Any, leaf: int, path: tuple[str, ...]) -> None:
        for name in dir(type(cache)):
            if name.startswith("_") or name in _READS or name in vars(cache):
                continue
            method = getattr(type(cache), name, None)
            if not callable(method) or isinstance(method, (property, type)):
                continue
            vars(cache)[name] = self._wrap(getattr(cache, name), leaf, path, name)
            self.patched.append((cache, name))
        for name, value in list(vars(cache).items()):
            if _is_cache(value) and len(path) < 2:
                self._patch(value, leaf, (*path, name))

    def _wrap(self, bound: Any, leaf: int, path: tuple[str, ...], name: str) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if self.depth == 0:
                leaves, spec = pytree.tree_flatten((args, kwargs))
                try:
                    self.calls.append((leaf, path, name, spec,
                                       tuple(_spec_of(v) for v in leaves)))
                except TypeError:
                    self.ok = False
            self.depth += 1
            try:
                return bound(*args, **kwargs)
            finally:
                self.depth -= 1
        return recorded

    def __exit__(self, *exc: object) -> None:
        for cache, name in self.patched:
            vars(cache).pop(name, None)


def _repeat(call: tuple, leaves: list) -> None:
    leaf, path, name, spec, arg_specs = call
    target = leaves[leaf]
    for attribute in path:
        target = getattr(target, attribute)
    args, kwargs = pytree.tree_unflatten([_make(s) for s in arg_specs], spec)
    getattr(target, name)(*args, **kwargs)
