"""The hooks that make a dispatched model run across ranks (see ``lockstep``): around each unit,
its inputs reach its rank and its outputs are held by its rank; another rank's unit runs as a
*meta shadow* here (its weights and inputs on meta: no compute, no memory, but right shapes, so
a KV cache gets entries of the right length on every rank). A call runs in lockstep on every
rank: the model's forward and ``generate`` are wrapped so that every rank checks it got the same
inputs, and a rank that fails takes the others down with its error."""

from __future__ import annotations

import hashlib
import logging
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import DistributedError, RankFailedError, RankMismatchError
from ..plan import DevicePlan
from ..plan.placements import EVERY_RANK
from ..slots import iter_slots, tensor_groups
from . import transport
from .faults import failing_together, report
from .group import Group
from .lockstep import ALL, Lockstep
from .shadow import FastMeta, RememberedShadow

logger = logging.getLogger(__name__)

STATE_ATTR = "_bigload_ranks"
_SMALL_HASH = 1 << 16  # inputs up to this many elements are compared by value across ranks


@dataclass
class RankUnit:
    """A unit as every rank sees it: its module, its rank, and, where it is another rank's, the
    real tensors of its subtree swapped for meta ones while its shadow runs."""

    name: str
    module: nn.Module
    rank: int
    device: torch.device  # where its inputs are received on its own rank
    swapped: list[tuple[dict, str, torch.Tensor]] = field(default_factory=list)
    inputs: set[int] = field(default_factory=set)
    paused: bool = False
    fast: FastMeta | None = None  # entered while its shadow runs
    real: list[tuple[dict, str]] | None = None  # where its real tensors are (found once)

    def enter_shadow(self) -> None:
        if self.real is None:  # a tie duplicate, non-persistent buffers: fixed after the load
            self.real = [(table, leaf) for module in self.module.modules()
                         for table in (module._parameters, module._buffers)
                         for leaf, tensor in table.items()
                         if tensor is not None and tensor.device.type != "meta"]
        for table, leaf in self.real:
            tensor = table[leaf]
            self.swapped.append((table, leaf, tensor))
            table[leaf] = _meta_like(tensor)

    def leave_shadow(self) -> None:
        while self.swapped:
            table, leaf, tensor = self.swapped.pop()
            table[leaf] = tensor


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, requires_grad=False) if isinstance(tensor, nn.Parameter) else meta


class RanksState:
    """What ``attach`` left on a model: the lockstep state and the units by position."""

    def __init__(self, lockstep: Lockstep, units: list[RankUnit], plan: DevicePlan):
        self.lockstep = lockstep
        self.units = units
        self.plan = plan
        self.handles: list[Any] = []


# --- attaching ---------------------------------------------------------------------------------
def attach(model: nn.Module, plan: DevicePlan, group: Group) -> nn.Module:
    """Make ``model`` (loaded and dispatched for ``plan``, this rank's view) run in lockstep
    with the other ranks of ``group``."""
    if plan.world_size != group.world_size or plan.rank != group.rank:
        raise DistributedError(
            f"the plan is rank {plan.rank}'s of {plan.world_size}, but this process is rank "
            f"{group.rank} of {group.world_size}; pass plan.for_rank(rank)")
    lockstep = Lockstep(group, weight_holders(model, plan), plan.main)
    units = [RankUnit(u.name, model.get_submodule(u.name), u.rank,
                      plan.execution_device(u) if u.rank == plan.rank else plan.main)
             for u in plan.units if _runs_alone(model, u.name)]
    state = RanksState(lockstep, units, plan)
    object.__setattr__(model, STATE_ATTR, state)
    for unit in units:
        if unit.rank != plan.rank:  # another rank's: its shadow here is remembered
            unit.module.__dict__["forward"] = RememberedShadow(unit.module, unit.module.forward)
    for position, unit in enumerate(units):
        object.__setattr__(unit.module, STATE_ATTR, state)
        state.handles += [
            unit.module.register_forward_pre_hook(UnitPre(position), with_kwargs=True,
                                                  prepend=True),
            unit.module.register_forward_hook(UnitPost(position), with_kwargs=True,
                                              always_call=True)]
    state.handles += [
        model.register_forward_pre_hook(CallPre(), with_kwargs=True, prepend=True),
        model.register_forward_hook(CallPost(), with_kwargs=True, always_call=True)]
    if callable(getattr(model, "generate", None)):
        model.__dict__["generate"] = types.MethodType(_lockstep_generate(model.generate), model)
    return model


def _runs_alone(model: nn.Module, name: str) -> bool:
    """A unit hooked across ranks: a module (not a tensor of a split module) that holds
    checkpoint tensors. Modules holding only non-persistent buffers (a rotary table) are on
    every rank and run between units like the rest of the model's code."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return False
    return module is not model and any(s.persistent for s in iter_slots(module))


def weight_holders(model: nn.Module, plan: DevicePlan) -> dict[int, frozenset[int]]:
    """id(tensor) → the ranks that hold it: its units' ranks (a tie split over ranks is held
    by each). Non-persistent buffers are on every rank and are not listed."""
    by_unit = {u.name: u.rank for u in plan.units}
    every = set(range(plan.world_size))
    holders: dict[int, frozenset[int]] = {}
    for group in tensor_groups(s for s in iter_slots(model) if s.persistent):
        ranks = {_unit_rank(plan, by_unit, s.fqn) for s in group} - {None}
        if EVERY_RANK in ranks:
            ranks = every
        if ranks:
            holders[id(group[0].tensor)] = frozenset(ranks)  # type: ignore[arg-type]
    return holders


def _unit_rank(plan: DevicePlan, by_unit: dict[str, int], fqn: str) -> int | None:
    unit = plan.unit_of(fqn)
    return None if unit is None else by_unit[unit.name]


def state_of(model: nn.Module) -> RanksState | None:
    return model.__dict__.get(STATE_ATTR)


# --- around each unit --------------------------------------------------------------------------
class UnitPre:
    def __init__(self, position: int):
        self.position = position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state: RanksState = module.__dict__[STATE_ATTR]
        ls, unit = state.lockstep, state.units[self.position]
        if not ls.active:
            raise DistributedError(
                f"{unit.name!r} runs on rank {unit.rank} of {ls.group.world_size}: call the "
                "model itself (or its generate()) on every rank, or wrap the calls in "
                "bigload.distributed.lockstep(model)")
        unit.paused = ls.pause()
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        ls.deliver(tensors, unit.rank, unit.device, f"the input of {unit.name!r}")
        if unit.rank == ls.rank:
            unit.inputs = {id(x) for x in tensors}
            return args, kwargs
        unit.enter_shadow()
        meta = [x.to("meta") if isinstance(x, torch.Tensor) and x.device.type != "meta" else x
                for x in leaves]
        unit.inputs = {id(x) for x in meta if isinstance(x, torch.Tensor)}
        unit.fast = ls.fast
        unit.fast.__enter__()
        return pytree.tree_unflatten(meta, spec)


class UnitPost:
    def __init__(self, position: int):
        self.position = position

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state: RanksState = module.__dict__[STATE_ATTR]
        ls, unit = state.lockstep, state.units[self.position]
        failed = output is None and sys.exc_info()[1] is not None
        try:
            if unit.fast is not None:
                unit.fast.__exit__(None, None, None)
                unit.fast = None
            unit.leave_shadow()
            if not failed:
                output = _owned_by(output, unit.rank, unit.inputs | _ids(args, kwargs), ls)
        finally:
            unit.inputs = set()
            if unit.paused:
                unit.paused = False
                ls.resume()
        return output


def _ids(args: tuple, kwargs: dict) -> set[int]:
    return {id(x) for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}


def _owned_by(output: Any, rank: int, inputs: set[int], ls: Lockstep) -> Any:
    """``output`` with every tensor held by ``rank``; a tensor the unit passed through from its
    inputs is aliased first, so that the input keeps what every rank knows of it."""
    leaves, spec = pytree.tree_flatten(output)
    changed = False
    for k, value in enumerate(leaves):
        if isinstance(value, torch.Tensor):
            if id(value) in inputs:
                leaves[k] = value = value.view_as(value)
                changed = True
            ls.tag(value, frozenset({rank}))
    return pytree.tree_unflatten(leaves, spec) if changed else output


# --- a call in lockstep ------------------------------------------------------------------------
class CallPre:
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        _enter(module.__dict__[STATE_ATTR], "forward", args, kwargs)


class CallPost:
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state: RanksState = module.__dict__[STATE_ATTR]
        _leave(state, sys.exc_info()[1] if output is None else None)
        return output


def _enter(state: RanksState, entry: str, args: tuple, kwargs: dict) -> None:
    ls = state.lockstep
    if ls.depth == 0:
        with failing_together(ls.group):
            if ls.check_inputs:
                _same_inputs(ls, entry, args, kwargs)
        ls.resume()
    ls.depth += 1


def _leave(state: RanksState, error: BaseException | None) -> None:
    ls = state.lockstep
    if ls.depth == 0:  # the call failed on entry (its inputs differ across ranks)
        return
    ls.depth -= 1
    if ls.depth > 0:
        return
    ls.pause()
    if isinstance(error, RankFailedError):
        ls.group.break_up()
    elif error is not None and not isinstance(error, RankMismatchError):
        report(ls.group, error)  # the others fail with this rank's error


def _lockstep_generate(generate: Callable) -> Callable:
    def lockstep_generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with lockstep(model, entry="generate", args=args, kwargs=kwargs):
            output = generate(*args, **kwargs)
            return share_tokens(model, output)
    lockstep_generate.__doc__ = generate.__doc__
    return lockstep_generate


@contextmanager
def lockstep(model: nn.Module, *, entry: str = "block", args: tuple = (),
             kwargs: dict | None = None) -> Iterator[None]:
    """Run a block of calls on ``model`` in lockstep: every rank must run the same block with
    the same inputs (a hand-written decoding loop, for instance)."""
    state = state_of(model)
    if state is None:
        yield
        return
    _enter(state, entry, args, kwargs or {})
    try:
        yield
    except BaseException as err:
        _leave(state, err)
        raise
    _leave(state, None)


def share_tokens(model: nn.Module, output: Any) -> Any:
    """Token ids (integer and bool tensors) in ``output`` made real on every rank; float values
    (logits, scores) stay with the rank that computed them."""
    state = state_of(model)
    if state is None:
        return output
    ls = state.lockstep
    found = [x for x in pytree.tree_leaves(output)
             if isinstance(x, torch.Tensor) and not x.is_floating_point()
             and ls.holders(x) is not ALL]
    if found:
        paused = ls.pause()
        try:
            ls.share(found, "the result of generate()")
        finally:
            if paused:
                ls.resume()
    return output


def _same_inputs(ls: Lockstep, entry: str, args: tuple, kwargs: dict) -> None:
    """Every rank runs the same call with the same inputs, or every rank raises."""
    mine = _digest(entry, args, kwargs)
    digests = transport.all_gather_object(ls.group, mine)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RankMismatchError(
            f"rank(s) {differ} called {entry}() with other inputs than rank 0 "
            f"({digests[differ[0]][1]} vs {digests[0][1]}): every rank must make the same "
            "calls with the same inputs (same prompt, same arguments, same seed)", differ)


def _digest(entry: str, args: tuple, kwargs: dict) -> tuple[str, str]:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    h = hashlib.sha256(f"{entry}|{spec}".encode())
    shapes = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            shapes.append(f"{tuple(x.shape)}:{str(x.dtype).removeprefix('torch.')}")
            h.update(shapes[-1].encode())
            if x.device.type != "meta" and x.numel() <= _SMALL_HASH:
                flat = x.detach().cpu().contiguous().view(-1)
                h.update((flat.view(torch.uint8) if flat.dtype == torch.bool else flat)
                         .view(torch.uint8).numpy().tobytes())
        elif isinstance(x, (int, float, str, bool, type(None), torch.dtype)):
            h.update(repr(x).encode())
        else:
            h.update(type(x).__qualname__.encode())
    return h.hexdigest()[:16], f"{entry}({', '.join(shapes) or 'no tensors'})"
