"""transformers (v5) checkpoint conversions, as bigload understands them: renames and derived
tensors, computed from headers only.

transformers v5 models may hold tensors in another layout than their checkpoints (which are
saved in the legacy layout): renamed (ViT ``encoder.layer.N.attention.attention.query`` →
``layers.N.attention.q_proj``, GPT-NeoX ``embed_out`` → ``lm_head``) or fused (Mixtral's
per-expert ``experts.N.w1/w3.weight`` → one ``mlp.experts.gate_up_proj``). ``from_pretrained``
converts on load with the model's conversion mapping
(``transformers.conversion_mapping.get_model_conversion_mapping``). :func:`plan_conversions`
runs that same mapping over a checkpoint's names (shapes by running the conversion operations
on ``meta`` tensors, so no tensor data is read) and returns:

* ``key_map`` — the plain renames, as regex → replacement rules for bigload's ``key_map``
  (``keys.apply_key_map``): exact for this checkpoint (checked), layer numbers generalised;
* ``derived`` — one :class:`DerivedTensor` per model tensor built from several checkpoint
  tensors (or from one, transformed): its sources and the function that builds it (the
  transformers ``WeightConverter`` itself, so its operations are transformers' own).

:func:`converted_index` presents the derived tensors as entries of a :class:`ConvertedIndex`
(``byte_range=None``: never zero-copy; their sources are left out), and
:meth:`ConvertedIndex.open_reader` a :class:`ConvertingReader` whose ``get(name)`` builds them.
A loader that opens its reader with :func:`open_reader` reads such an index like any other.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointIndex, CheckpointReader, TensorEntry, open_reader
from .errors import CheckpointMismatchError, CorruptCheckpointError, format_problems
from .keys import apply_key_map

logger = logging.getLogger(__name__)

__all__ = [
    "Conversions",
    "ConvertedIndex",
    "ConvertingReader",
    "DerivedTensor",
    "converted_index",
    "open_reader",
    "plan_conversions",
    "prepare_checkpoint",
]


def prepare_checkpoint(
    model: nn.Module,
    index: CheckpointIndex,
    key_map: Mapping[str, str] | None = None,
) -> tuple[CheckpointIndex, dict[str, str] | None]:
    """``(index, key_map)`` to load or verify ``index`` into the
    transformers ``model``: its conversions planned (:func:`plan_conversions`), derived tensors
    as entries (:func:`converted_index`), renames added to ``key_map``. Raises
    CheckpointMismatchError for conversions that cannot be planned."""
    conversions = plan_conversions(model, index)
    raise_for_conversion_problems(conversions, model)
    merged = {**(key_map or {}), **conversions.key_map}
    return converted_index(index, conversions), merged or None


# --- what a conversion plan holds ---------------------------------------------------------------
@dataclass(frozen=True)
class DerivedTensor:
    """A model tensor built from checkpoint tensors: ``build(sources)`` → the tensor.

    ``sources`` are checkpoint keys, in the order ``build`` takes their tensors; ``shape`` and
    ``dtype`` are what ``build`` returns (before any load-time cast). Tensors built together
    (one fused checkpoint tensor chunked into q/k/v) share a ``group``; ``build_group`` returns
    all of them at once.
    """

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    group: str
    build_group: Callable[[Sequence[torch.Tensor]], dict[str, torch.Tensor]] = field(repr=False)
    how: str = ""  # e.g. "MergeModulelist(dim=0) + Concatenate(dim=1)"

    def build(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.build_group(tensors)[self.name]


@dataclass(frozen=True)
class Conversions:
    """The conversions a model applies to one checkpoint (see the module doc)."""

    key_map: Mapping[str, str] = field(default_factory=dict)  # regex -> replacement
    renamed: Mapping[str, str] = field(default_factory=dict)  # checkpoint key -> model name
    derived: Mapping[str, DerivedTensor] = field(default_factory=dict)  # model fqn -> recipe
    problems: tuple[str, ...] = ()  # conversions that match the checkpoint but cannot be planned

    def __bool__(self) -> bool:
        return bool(self.key_map or self.derived or self.problems)

    @property
    def consumed(self) -> set[str]:
        """Checkpoint keys read only to build derived tensors."""
        return {s for d in self.derived.values() for s in d.sources}


# --- planning from the model's transformers conversion mapping ----------------------------------
def plan_conversions(model: nn.Module, index: CheckpointIndex) -> Conversions:
    """The renames and derived tensors transformers' ``from_pretrained`` would apply when it
    loads ``index`` into ``model`` (a skeleton on meta is fine). Empty when transformers has no
    conversion mapping (transformers < 5) or the model has none that matches."""
    tools = _transformers_tools()
    if tools is None or not hasattr(model, "config"):
        return Conversions()
    try:
        mapping = tools.get_model_conversion_mapping(model)
    except Exception as err:  # a model transformers cannot map: nothing to convert
        logger.warning("no transformers conversion mapping for %s: %s", type(model).__name__, err)
        return Conversions()
    renamings = [t for t in mapping if isinstance(t, tools.WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, tools.WeightConverter)]
    if not renamings and not converters:
        return Conversions()
    model_names = dict.fromkeys(model.state_dict(keep_vars=True), True)
    prefix = getattr(model, "base_model_prefix", None) or None
    by_pattern = {p: c for c in converters for p in c.source_patterns}

    renamed: dict[str, str] = {}
    groups: dict[str, _Group] = {}
    for key in sorted(index.entries, key=tools.dot_natural_key):
        final, pattern = tools.rename_source_key(key, renamings, converters, prefix, model_names)
        if final not in model_names and key in model_names:
            continue  # already a name of the model: kept (as transformers keeps it)
        if final not in model_names:
            continue  # unexpected for transformers too: bigload's verify reports it
        if pattern is not None:
            group = groups.get(final)
            if group is None:
                group = groups[final] = _Group(final, copy.deepcopy(by_pattern[pattern]), model)
            group.add(pattern, key)
            continue
        plain = tools.apply_renamings(key, renamings)
        if plain != key:  # a prefix-only change is left to bigload's own prefix matching
            renamed[key] = plain

    derived: dict[str, DerivedTensor] = {}
    problems: list[str] = []
    for group in groups.values():
        try:
            for tensor in group.plan(index, model_names):
                derived[tensor.name] = tensor
        except Exception as err:  # an operation that cannot run on meta, or a malformed group
            problems.append(f"{group.name!r} from {len(group.keys)} checkpoint tensor(s) "
                            f"({', '.join(group.keys[:3])}{', …' if len(group.keys) > 3 else ''})"
                            f": {type(err).__name__}: {err}")
    key_map = _key_map(renamed, [n for n in index.entries if n not in renamed] + list(derived))
    conversions = Conversions(MappingProxyType(key_map), MappingProxyType(renamed),
                              MappingProxyType(derived), tuple(problems))
    if conversions:
        logger.info("transformers conversions for %s: %d renamed, %d derived from %d, %d failed",
                    type(model).__name__, len(renamed), len(derived),
                    len(conversions.consumed), len(problems))
    return conversions


def raise_for_conversion_problems(conversions: Conversions, model: nn.Module) -> None:
    """Refuse a load whose conversions cannot be planned (it would load garbage or nothing)."""
    if not conversions.problems:
        return
    raise CheckpointMismatchError(
        f"{len(conversions.problems)} tensor(s) of {type(model).__name__} are built from the "
        "checkpoint by transformers conversions that bigload cannot plan:\n"
        + format_problems(list(conversions.problems))
        + "\nNothing was loaded. Load with transformers, or re-save the checkpoint in the "
        "model's own layout (save_pretrained of a converted model, safetensors.torch.save_file).",
        problems=list(conversions.problems),
    )


class _Group:
    """The checkpoint tensors one transformers ``WeightConverter`` turns into model tensors."""

    def __init__(self, name: str, converter: Any, model: nn.Module):
        self.name = name  # transformers' layer name: the first target, full name
        self.converter = converter
        self.model = model
        self.by_pattern: dict[str, list[str]] = {}
        self.keys: list[str] = []

    def add(self, pattern: str, key: str) -> None:
        self.by_pattern.setdefault(pattern, []).append(key)
        self.keys.append(key)

    def run(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The converter's output for these source tensors (checkpoint key → tensor)."""
        converter = copy.deepcopy(self.converter)
        for pattern, keys in self.by_pattern.items():
            for key in keys:
                converter.add_tensor(self.name, key, pattern, _constant(tensors[key]))
        out = converter.convert(self.name, model=self.model, config=getattr(
            self.model, "config", None))
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}

    def plan(self, index: CheckpointIndex, model_names: Mapping[str, Any]) -> list[DerivedTensor]:
        sources = tuple(self.keys)
        metas = {k: torch.empty(index[k].shape, dtype=index[k].dtype, device="meta")
                 for k in sources}
        outputs = self.run(metas)
        unknown = [n for n in outputs if n not in model_names]
        if unknown:
            raise ValueError(f"it builds {unknown}, which the model does not have")
        how = " + ".join(repr(op) for op in getattr(self.converter, "operations", []))

        def build_group(values: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                built = self.run(dict(zip(sources, values)))
            return {n: t.contiguous() for n, t in built.items()}

        return [DerivedTensor(name, sources, tuple(t.shape), t.dtype, self.name, build_group, how)
                for name, t in outputs.items()]


def _constant(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


@dataclass(frozen=True)
class _Tools:
    get_model_conversion_mapping: Callable[..., list]
    rename_source_key: Callable[..., tuple[str, str | None]]
    apply_renamings: Callable[[str, list], str]
    dot_natural_key: Callable[[str], Any]
    WeightRenaming: type  # noqa: N815 - transformers' class names
    WeightConverter: type  # noqa: N815


def _transformers_tools() -> _Tools | None:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            apply_renamings,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:  # transformers < 5 (or absent): renames come from the model attribute
        return None
    return _Tools(get_model_conversion_mapping, rename_source_key, apply_renamings,
                  dot_natural_key, WeightRenaming, WeightConverter)


# --- renames as a key_map -----------------------------------------------------------------------
_NUMBER = re.compile(r"(?:(?<=^)|(?<=\.))\d+(?=\.|$)")  # a whole dotted component: 'layers.12.'
_MARK = "\x00"  # prefixes renamed names in the exact fallback, so no rule matches a rule's output


def _key_map(renamed: Mapping[str, str], others: Sequence[str]) -> dict[str, str]:
    """Rules (regex → replacement) that rename exactly ``renamed`` and leave ``others`` alone,
    with layer numbers generalised (one rule per renamed tensor of a layer, not per layer)."""
    if not renamed:
        return {}
    rules = dict(_template(old, new) for old, new in renamed.items())
    if _renames_exactly(rules, renamed, others):
        return rules
    rules = {f"^{re.escape(old)}$": _MARK + _literal(new) for old, new in renamed.items()}
    rules[f"^{_MARK}"] = ""
    return rules


def _template(old: str, new: str) -> tuple[str, str]:
    numbers = _NUMBER.findall(old)
    if not numbers or _NUMBER.findall(new) != numbers:
        return f"^{re.escape(old)}$", _literal(new)
    pattern, last = "^", 0
    for m in _NUMBER.finditer(old):
        pattern += re.escape(old[last:m.start()]) + r"(\d+)"
        last = m.end()
    pattern += re.escape(old[last:]) + "$"
    replacement, last = "", 0
    for i, m in enumerate(_NUMBER.finditer(new), start=1):
        replacement += _literal(new[last:m.start()]) + rf"\g<{i}>"
        last = m.end()
    return pattern, replacement + _literal(new[last:])


def _literal(text: str) -> str:
    return text.replace("\\", "\\\\")


def _renames_exactly(
    rules: Mapping[str, str], renamed: Mapping[str, str], others: Sequence[str]
) -> bool:
    wanted = {**{o: o for o in others}, **renamed}
    got = apply_key_map(wanted, rules)  # renamed name -> original key
    return len(got) == len(wanted) and all(wanted.get(orig) == new for new, orig in got.items())


# --- derived tensors as index entries -----------------------------------------------------------
@dataclass(frozen=True)
class ConvertedIndex(CheckpointIndex):
    """A checkpoint index whose ``derived`` tensors are entries too (``byte_range=None``, the file
    of their first source); the checkpoint tensors they are built from are not entries.
    ``source`` is the index of the files as stored. Read it with :meth:`open_reader`."""

    source: CheckpointIndex | None = None
    derived: Mapping[str, DerivedTensor] = field(default_factory=dict)

    def open_reader(self) -> ConvertingReader:
        return ConvertingReader(self)


def converted_index(index: CheckpointIndex, conversions: Conversions) -> CheckpointIndex:
    """``index`` with ``conversions.derived`` as entries in place of their sources (``index``
    itself when nothing is derived). Renames stay in ``conversions.key_map``."""
    if not conversions.derived:
        return index
    consumed = conversions.consumed
    built_at: dict[str, list[DerivedTensor]] = {}  # in file order, where the first source was
    for derived in conversions.derived.values():
        built_at.setdefault(derived.sources[0], []).append(derived)
    entries: dict[str, TensorEntry] = {}
    for name, entry in index.entries.items():
        for derived in built_at.get(name, ()):
            entries[derived.name] = TensorEntry(derived.name, entry.file, derived.dtype,
                                                derived.shape, None)
        if name not in consumed:
            entries[name] = entry
    note = (f"{len(conversions.derived)} tensor(s) built from {len(consumed)} checkpoint "
            "tensor(s) by transformers conversions")
    return ConvertedIndex(
        root=index.root, format=index.format, files=index.files,
        entries=MappingProxyType(entries), metadata=index.metadata,
        notes=(*index.notes, note), total_bytes=sum(e.nbytes for e in entries.values()),
        identities=index.identities, source=index,
        derived=MappingProxyType(dict(conversions.derived)),
    )


class ConvertingReader:
    """A :class:`CheckpointReader` of a :class:`ConvertedIndex`: stored tensors as stored
    (zero-copy views where the format allows), derived ones built on ``get`` from their sources.

    Thread-safe. Tensors built together (one group) are built once: the others wait in the
    reader until asked for.
    """

    def __init__(self, index: ConvertedIndex):
        if index.source is None:
            raise ValueError("a ConvertedIndex needs its source index")
        self.index = index
        self._base = CheckpointReader(index.source)
        self._locks = {d.group: threading.Lock() for d in index.derived.values()}
        self._built: dict[str, torch.Tensor] = {}

    def __enter__(self) -> ConvertingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def base(self) -> CheckpointReader:
        """The reader of the stored tensors."""
        return self._base

    def get(self, name: str) -> torch.Tensor:
        """The CPU tensor ``name`` of the index: a stored tensor, or a derived one built now."""
        derived = self.index.derived.get(name)
        if derived is None:
            self.index[name]  # KeyError naming the checkpoint for unknown (or consumed) names
            return self._base.get(name)
        with self._locks[derived.group]:
            tensor = self._built.pop(name, None)
            if tensor is None:
                built = derived.build_group([self._base.get(s) for s in derived.sources])
                tensor = built.pop(name)
                self._built.update((n, t) for n, t in built.items() if n in self.index.derived)
        return _checked(derived, tensor)

    def mmap_for(self, file: str | Path) -> Any:
        return self._base.mmap_for(file)

    def close(self) -> None:
        self._built.clear()
        self._base.close()


def _checked(derived: DerivedTensor, tensor: torch.Tensor) -> torch.Tensor:
    if tuple(tensor.shape) != derived.shape or tensor.dtype != derived.dtype:
        raise CorruptCheckpointError(
            f"{derived.name!r}, built from {len(derived.sources)} checkpoint tensor(s) "
            f"({derived.how}), is {tuple(tensor.shape)} {tensor.dtype}; its headers said "
            f"{derived.shape} {derived.dtype}. The checkpoint changed since it was indexed?"
        )
    return tensor


