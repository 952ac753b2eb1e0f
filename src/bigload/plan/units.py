"""Units: the pieces a model is placed in — modules kept whole by a no-split rule, split modules'
own tensors, leaves — in execution order, each with its bytes. A tensor shared by several units
(a tie) is counted once, in the first unit that holds it; later holders are its partners."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import DeviceMapError
from ..sizes import TensorSize, module_sizes
from ..slots import iter_slots

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitSpec:
    """A unit to place: fqn, why it is one piece, its bytes (buffers among them), whether a
    no-split rule keeps it whole, and the earlier unit it shares a tensor with."""

    name: str
    why: str
    size_bytes: int
    buffer_bytes: int
    whole: bool
    tied_to: str | None = None
    buffers: tuple[str, ...] = ()  # fqns of the buffers counted in it
    piece_of: str | None = None  # the unit it is a piece of, when that unit streams in pieces
    shared_bytes: int = 0  # bytes of the tensors it shares with earlier units (counted there)
    is_tensor: bool = False  # a tensor of a split module, not a module


@dataclass(frozen=True)
class NoSplitRule:
    """Modules kept whole: by class name, or by fqn (the repeated blocks of a container)."""

    classes: frozenset[str]
    fqns: frozenset[str] = frozenset()
    container: str = ""

    def why_whole(self, module: nn.Module, fqn: str) -> str | None:
        name = type(module).__name__
        if name in self.classes:
            return f"no-split unit ({name})"
        if fqn in self.fqns:
            return f"no-split unit (repeated block of {self.container!r})"
        return None


def class_names(classes: Any, what: str = "no_split_module_classes") -> frozenset[str]:
    """Class names from a name, a class, or an iterable of them; DeviceMapError otherwise."""
    if isinstance(classes, (str, type)):
        classes = [classes]
    try:
        items = list(classes)
    except TypeError:
        items = [classes]
    bad = [c for c in items if not isinstance(c, (str, type))]
    if bad:
        raise DeviceMapError(
            f"{what}: {bad[0]!r} ({type(bad[0]).__name__}) is not a module class or class name; "
            "pass names like ['LlamaDecoderLayer'] or classes"
        )
    return frozenset(c if isinstance(c, str) else c.__name__ for c in items)


def no_split_rule(
    model: nn.Module, classes: Any, entries: list[TensorSize]
) -> tuple[NoSplitRule, tuple[str, ...]]:
    """Units kept whole: the given classes, else the model's ``_no_split_modules``, else the
    repeated blocks of its largest ModuleList/Sequential. Returns the rule and a note."""
    declared = getattr(model, "_no_split_modules", None) or None
    if classes is None and declared is None:
        return repeated_blocks(model, entries)
    names = class_names(declared if classes is None else classes)
    present = {type(m).__name__ for m in model.modules()}
    for name in sorted(names - present) if classes is not None else ():
        logger.warning(
            "no_split_module_classes: %s matches no module of %s", name, type(model).__name__
        )
    shown = ", ".join(sorted(names)) or "none (split freely)"
    source = "" if classes is not None else f" (declared by {type(model).__name__})"
    return NoSplitRule(frozenset(names)), (f"no-split classes{source}: {shown}",)


def repeated_blocks(
    model: nn.Module, entries: list[TensorSize]
) -> tuple[NoSplitRule, tuple[str, ...]]:
    """Keep whole the children of the largest ModuleList/Sequential (by bytes)."""
    sizes = module_sizes(entries)
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m._modules) > 1 and sizes.get(name)
    ]
    if not lists:
        return NoSplitRule(frozenset()), ("no repeated blocks found: split down to leaves",)
    name, container = max(lists, key=lambda item: sizes.get(item[0], 0))
    dot = f"{name}." if name else ""
    fqns = frozenset(dot + child for child in container._modules)
    note = (
        f"kept whole: the {len(fqns)} children of {name or '<root>'!r} ({type(container).__name__})"
    )
    logger.info("%s; pass no_split_module_classes to choose other units", note)
    return NoSplitRule(frozenset(), fqns, name), (note,)


def plan_units(
    model: nn.Module, entries: list[TensorSize], rule: NoSplitRule,
    split: frozenset[str] = frozenset(),
) -> list[UnitSpec]:
    """Units in execution order. A tensor is counted in the first unit holding it; a later
    holder names that unit in ``tied_to``. Units named in ``split`` become their pieces (down
    to the modules that hold tensors), which page in one at a time."""
    position = {fqn: i for i, entry in enumerate(entries) for fqn in entry.fqns}
    holder: dict[int, str] = {}
    result = []
    for name, why, module, piece_of in walk(model, "", rule, split):
        held = list(dict.fromkeys(_held(name, module, position)))
        new = [i for i in held if i not in holder]
        tied_to = next((holder[i] for i in held if i in holder), None)
        holder.update(dict.fromkeys(new, name))
        size = sum(entries[i].size_bytes for i in new)
        buffers = [entries[i] for i in new if entries[i].kind == "buffer"]
        whole = rule.why_whole(module, name) is not None if module is not None else False
        shared = sum(entries[i].size_bytes for i in held if i not in new)
        result.append(UnitSpec(name, why, size, sum(b.size_bytes for b in buffers), whole,
                               tied_to, tuple(b.fqns[0] for b in buffers), piece_of, shared,
                               is_tensor=module is None))
    return result


def walk(
    module: nn.Module, prefix: str, rule: NoSplitRule, split: frozenset[str] = frozenset(),
    piece_of: str | None = None,
) -> Iterator[tuple[str, str, nn.Module | None, str | None]]:
    """(fqn, why, module or None for a tensor, the unit it is a piece of) of each unit under
    ``module``, in registration order (a split module's own tensors first)."""
    if prefix in split and piece_of is None:
        yield from walk(module, prefix, NoSplitRule(frozenset()), split, prefix)
        return
    why = rule.why_whole(module, prefix)
    children = [(n, m) for n, m in module._modules.items() if m is not None]
    if piece_of is not None:
        why = f"piece of {piece_of!r}, which streams in pieces" if why is None else why
    if rule.why_whole(module, prefix) is not None or not children:
        yield prefix, why or ("leaf module" if prefix else "whole model"), module, piece_of
        return
    dot = f"{prefix}." if prefix else ""
    owner = f"tensor of split module {prefix!r}" if prefix else "tensor of the root module"
    if piece_of is not None:
        owner = f"tensor of {prefix!r}, a piece of {piece_of!r}"
    for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
        if tensor is not None:
            yield dot + name, owner, None, piece_of
    for name, child in children:
        yield from walk(child, dot + name, rule, split, piece_of)


def _held(name: str, module: nn.Module | None, position: Mapping[str, int]) -> Iterable[int]:
    if module is None:
        return [position[name]]
    dot = f"{name}." if name else ""
    return [position[dot + s.fqn] for s in iter_slots(module)]
