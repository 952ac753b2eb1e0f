"""Every rank runs the same Python call (``generate``, a forward) in lockstep; each tensor knows
which ranks hold its value. A unit's output is held by its rank (the others get a ``meta``
tensor of the same shape); code between units runs on every rank, for real where its inputs are
held and on ``meta`` elsewhere, so shapes (and a KV cache's lengths) are right everywhere. A
value crosses ranks only when a rank must compute with it: a unit's input goes to the unit's
rank, and a Python value read from a tensor (``if done:``, ``.item()``) is broadcast to all.

The rules live in a TorchFunctionMode that is active between units (inside a unit the model's
own code runs untouched). Holders are per tensor: ``ALL`` (every rank: model inputs, values
computed from them), a set of ranks, or ``GHOST`` (a meta tensor made inside another rank's
unit, such as its KV cache entries, whose value nobody here needs)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..errors import DistributedError
from . import transport
from .group import Group
from .shadow import FastMeta

logger = logging.getLogger(__name__)

ALL = None  # held by every rank
GHOST = frozenset({-1})  # meta here, held by no rank we know of
HOLDERS_ATTR = "_bigload_holders"

# Tensor methods and torch functions that read values into Python or whose result's shape
# depends on values: their tensor inputs must be real on every rank first.
READS_VALUES = frozenset({
    "__bool__", "item", "tolist", "__int__", "__float__", "__index__", "__complex__", "numpy",
    "__array__", "__repr__", "__str__", "__format__", "__contains__", "nonzero", "argwhere",
    "masked_select", "unique", "unique_consecutive", "equal", "allclose", "bincount", "histc",
    "is_nonzero", "data_ptr", "__reduce_ex__", "__deepcopy__",
})
_INPLACE_DUNDER = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
})
_DEVICE_GETTERS = {"device": lambda d: d, "is_meta": lambda d: False,
                   "is_cuda": lambda d: d.type == "cuda", "is_cpu": lambda d: d.type == "cpu"}
_GETTERS = {getattr(torch.Tensor, name).__get__: name for name in _DEVICE_GETTERS}


def _name(func: Any) -> str:
    return getattr(func, "__name__", "")


def _leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Tensor arguments, one level into lists and tuples (``torch.cat``)."""
    out = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
    return out


def _reads_values(func: Any, args: tuple, kwargs: dict) -> bool:
    name = _name(func)
    if name in READS_VALUES:
        return True
    if name in ("__getitem__", "__setitem__", "index_put", "index_put_") and len(args) > 1:
        index = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in index)
    if name == "where" and len(args) + len(kwargs) == 1:
        return True
    if name == "repeat_interleave" and "output_size" not in kwargs:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor)
    return False


def _is_inplace(func: Any, kwargs: dict) -> bool:
    name = _name(func)
    return (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDER or (
        "out" in kwargs)


def meet(holders: Iterable[frozenset[int] | None]) -> frozenset[int] | None:
    """The ranks that hold every one of the values (ALL when each is held everywhere)."""
    result = ALL
    for h in holders:
        if h is GHOST:
            return GHOST
        if h is not ALL:
            result = h if result is ALL else result & h
    return result


def to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "meta" else value.to("meta")
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(to_meta(v) for v in value) if not hasattr(value, "_fields") else (
            type(value)(*(to_meta(v) for v in value)))
    return value


_MOVES = frozenset({"cpu", "cuda", "xpu", "mps", "pin_memory"})


def _on_meta(func: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments of ``func`` for running it on meta: tensors on meta, and the devices it
    would move to replaced by meta (a value not held here is not moved anywhere)."""
    name = _name(func)
    meta_args = tuple(to_meta(a) for a in args)
    meta_kwargs = {k: to_meta(v) for k, v in kwargs.items()}
    if "device" in meta_kwargs:
        meta_kwargs["device"] = torch.device("meta")
    if name == "to":
        meta_args = meta_args[:1] + tuple(
            torch.device("meta") if isinstance(a, (torch.device, str)) or (
                isinstance(a, int) and not isinstance(a, bool)) else a for a in meta_args[1:])
        meta_kwargs.pop("non_blocking", None)
    return meta_args, meta_kwargs


class Lockstep:
    """The state every rank keeps for one model: its group, which ranks hold each weight, the
    device its values between units live on, and the mode that runs code between units."""

    def __init__(self, group: Group, weight_holders: dict[int, frozenset[int]],
                 device: torch.device):
        self.group = group
        self.rank = group.rank
        self.weight_holders = weight_holders  # id(weight) -> ranks that hold it
        self.device = device
        self.mode = BetweenUnits(self)
        self.fast = FastMeta()  # another rank's units run here as fast meta shadows
        self.depth = 0  # nested calls in lockstep (generate → forward)
        self.check_inputs = True

    # --- who holds what ------------------------------------------------------------------------
    def holders(self, x: torch.Tensor) -> frozenset[int] | None:
        tagged = x.__dict__.get(HOLDERS_ATTR)
        if tagged is not None:
            return tagged
        known = self.weight_holders.get(id(x))
        if known is not None:
            return known
        return GHOST if x.device.type == "meta" else ALL

    def holds(self, x: torch.Tensor) -> bool:
        h = self.holders(x)
        return h is ALL or (h is not GHOST and self.rank in h)

    @staticmethod
    def tag(x: torch.Tensor, holders: frozenset[int] | None) -> None:
        if holders is ALL or holders is GHOST:
            x.__dict__.pop(HOLDERS_ATTR, None)
        else:
            x.__dict__[HOLDERS_ATTR] = holders

    # --- moving values -------------------------------------------------------------------------
    def deliver(self, tensors: Iterable[torch.Tensor], dst: int, device: torch.device,
                what: str) -> None:
        """Make each of ``tensors`` held by rank ``dst`` too: its lowest holder sends it there
        (every rank calls this at the same point and agrees on who sends)."""
        for x in tensors:
            h = self.holders(x)
            if h is ALL or (h is not GHOST and dst in h):
                continue
            if h is GHOST:
                if self.rank == dst:
                    raise _ghost_error(x, what)
                continue
            src = min(h)
            if self.rank == src:
                transport.send(self.group, x, dst)
            elif self.rank == dst:
                _become(x, transport.recv(self.group, x, src, device))
            self.tag(x, h | {dst})

    def share(self, tensors: Iterable[torch.Tensor], what: str) -> None:
        """Make each of ``tensors`` held by every rank (broadcast from its lowest holder)."""
        for x in tensors:
            h = self.holders(x)
            if h is ALL:
                continue
            if h is GHOST:
                raise _ghost_error(x, what)
            if id(x) in self.weight_holders:
                raise DistributedError(
                    f"{what} reads the values of a weight ({tuple(x.shape)}, held by rank(s) "
                    f"{sorted(h)}) outside its unit: weights never leave their rank. Keep the "
                    "modules that read it in one unit (no_split_module_classes).")
            value = transport.broadcast(self.group, x, min(h), self.device)
            if value is not x:
                _become(x, value)
            self.tag(x, ALL)

    # --- the mode ------------------------------------------------------------------------------
    def pause(self) -> bool:
        """Take the mode off the stack (a unit runs its own code); True when it was on."""
        stack = []
        found = False
        while torch._C._len_torch_function_stack():
            mode = torch._C._pop_torch_function_stack()
            if mode is self.mode:
                found = True
                break
            stack.append(mode)
        for mode in reversed(stack):
            torch._C._push_on_torch_function_stack(mode)
        return found

    def resume(self) -> None:
        torch._C._push_on_torch_function_stack(self.mode)

    @property
    def active(self) -> bool:
        return self.depth > 0


def _become(x: torch.Tensor, value: torch.Tensor) -> None:
    """``x`` (a meta placeholder here) takes ``value``'s data, keeping its Python identity so
    that every reference to it sees the value."""
    try:
        torch.utils.swap_tensors(x, value)
    except RuntimeError as err:
        raise DistributedError(
            f"cannot fill the placeholder of a value {tuple(value.shape)} received from another "
            f"rank ({err}); something holds a weak reference to it") from err


def _ghost_error(x: torch.Tensor, what: str) -> DistributedError:
    return DistributedError(
        f"{what} needs the value of a tensor {tuple(x.shape)} {x.dtype} that no rank is known "
        "to hold: it was made inside another rank's unit and reached this rank without "
        "passing through a unit's output (a cache entry read for its values?). Keep the code "
        "that reads it inside one unit.")


class BetweenUnits(TorchFunctionMode):
    """The rules for code between units; see the module docstring."""

    def __init__(self, state: Lockstep):
        super().__init__()
        self.state = state

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        getter = _GETTERS.get(func)
        if getter is not None:
            return self._getter(getter, func, args)
        leaves = _leaves(args, kwargs)
        if not leaves:
            return func(*args, **kwargs)
        st = self.state
        holders = [st.holders(x) for x in leaves]
        if all(h is ALL for h in holders):
            return func(*args, **kwargs)
        if _reads_values(func, args, kwargs):
            st.share(leaves, f"reading values with {_name(func) or func}")
            return func(*args, **kwargs)
        common = meet(holders)
        if common is not ALL and common is not GHOST and not common:
            st.share(leaves, f"combining values of different ranks with {_name(func) or func}")
            return func(*args, **kwargs)
        if common is ALL or (common is not GHOST and st.rank in common):
            out = func(*args, **kwargs)
            return self._tagged(func, args, kwargs, out, leaves, common)
        meta_args, meta_kwargs = _on_meta(func, args, kwargs)
        if _name(func) in _MOVES:  # .cpu() of a value held elsewhere: its placeholder
            return self._tag_new(meta_args[0].view_as(meta_args[0]), (), common)
        out = st.fast.__torch_function__(func, types, meta_args, meta_kwargs)  # shapes only
        if _is_inplace(func, kwargs) and args and isinstance(args[0], torch.Tensor):
            target = args[0]
            if target.device.type != "meta":
                _become(target, meta_args[0])
            st.tag(target, common)
            return target if out is meta_args[0] else self._tag_new(out, (), common)
        return self._tag_new(out, (), common)

    def _getter(self, name: str, func: Any, args: tuple) -> Any:
        value = func(*args)
        device = args[0].device if name != "device" else value
        if device.type == "meta" and self.state.device.type != "meta":
            return _DEVICE_GETTERS[name](self.state.device)
        return value

    def _tagged(self, func: Any, args: tuple, kwargs: dict, out: Any,
                leaves: list[torch.Tensor], common: frozenset[int] | None) -> Any:
        if _is_inplace(func, kwargs) and args and isinstance(args[0], torch.Tensor):
            self.state.tag(args[0], common)
        return self._tag_new(out, leaves, common)

    def _tag_new(self, out: Any, inputs: Iterable[torch.Tensor], common: Any) -> Any:
        if common is ALL or common is GHOST:
            return out
        seen = {id(x) for x in inputs}
        if isinstance(out, torch.Tensor):
            if id(out) not in seen:
                self.state.tag(out, common)
        elif isinstance(out, (tuple, list)):
            for value in out:
                if isinstance(value, torch.Tensor) and id(value) not in seen:
                    self.state.tag(value, common)
        return out
