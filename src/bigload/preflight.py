"""Pre-flight: the model's tensors against a checkpoint index, every problem found at once.

Nothing here reads tensor data or changes the model. ``verify()`` returns a ``VerifyReport``;
``raise_for_problems`` turns it into one error listing every problem and the way out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .checkpoint import CheckpointIndex, read_index
from .devices import placement_str
from .errors import CheckpointMismatchError, MissingWeightsError, SkeletonError, format_problems
from .keys import apply_key_map, match_keys, prefix_hint
from .plan import DevicePlan
from .slots import TensorSlot, iter_slots, tensor_groups

logger = logging.getLogger(__name__)

Unexpected = Literal["error", "warn", "ignore"]


@dataclass(frozen=True)
class ModelTensor:
    """One tensor of the model, with every name it goes by (a tie group has several)."""

    names: tuple[str, ...]
    slot: TensorSlot
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_meta: bool

    @property
    def fqn(self) -> str:
        return self.names[0]


def model_tensors(model: nn.Module) -> tuple[list[ModelTensor], list[TensorSlot]]:
    """Persistent tensors grouped by identity (ties), and the non-persistent buffer slots."""
    slots_ = list(iter_slots(model))
    nonpersistent = [s for s in slots_ if not s.persistent]
    tensors = []
    for slots in tensor_groups(s for s in slots_ if s.persistent):
        t = slots[0].tensor
        names = tuple(s.fqn for s in slots)
        is_meta = t.device.type == "meta"
        tensors.append(ModelTensor(names, slots[0], tuple(t.shape), t.dtype, is_meta))
    return tensors, nonpersistent


@dataclass(frozen=True)
class VerifyReport:
    """How a model and a checkpoint line up. ``key_for`` maps each loadable model fqn (the first
    name of its tie group) to its checkpoint key."""

    checkpoint: str
    model_class: str
    n_files: int
    n_checkpoint_tensors: int
    key_for: Mapping[str, str]
    missing: tuple[str, ...]
    kept: tuple[str, ...]  # real buffers the checkpoint lacks: they keep their module's values
    unexpected: tuple[str, ...]
    shape_mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    dtype_mismatches: tuple[tuple[str, str, str], ...]
    tied: tuple[tuple[str, ...], ...]
    meta_nonpersistent: tuple[str, ...]
    prefix_change: str | None
    planned: Mapping[str, str] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    tie_hints: Mapping[str, str] = field(default_factory=dict)  # missing fqn -> embedding fqn
    # tie groups whose members are stored under several keys: ((fqn, key), ...) per group
    tie_conflicts: tuple[tuple[tuple[str, str], ...], ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches
                    or self.dtype_mismatches or self.meta_nonpersistent)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint, "model_class": self.model_class,
            "files": self.n_files, "checkpoint_tensors": self.n_checkpoint_tensors,
            "matched": len(self.key_for), "missing": list(self.missing), "kept": list(self.kept),
            "unexpected": list(self.unexpected),
            "shape_mismatches": [
                {"name": n, "model": list(a), "checkpoint": list(b)}
                for n, a, b in self.shape_mismatches
            ],
            "dtype_mismatches": [
                {"name": n, "model": a, "checkpoint": b} for n, a, b in self.dtype_mismatches
            ],
            "tied": [list(g) for g in self.tied],
            "meta_nonpersistent_buffers": list(self.meta_nonpersistent),
            "prefix_change": self.prefix_change,
        }

    def __str__(self) -> str:
        lines = [
            f"{self.model_class} vs checkpoint {self.checkpoint!r} "
            f"({self.n_files} file(s), {self.n_checkpoint_tensors} tensors)",
            f"  matched:    {len(self.key_for)}",
            f"  tied:       {len(self.tied)} group(s)"
            + "".join(f"\n    {' = '.join(g)}" for g in self.tied[:10]),
            f"  missing:    {len(self.missing)}",
            f"  kept (real buffers not in the checkpoint): {len(self.kept)}",
            f"  unexpected: {len(self.unexpected)}",
            f"  shape mismatches: {len(self.shape_mismatches)}",
            f"  dtype category mismatches: {len(self.dtype_mismatches)}",
        ]
        if self.prefix_change:
            lines.append(f"  checkpoint keys {self.prefix_change} to match the model")
        body = self.problem_lines(unexpected="warn")
        if body:
            lines.append("problems:\n" + format_problems(body))
        return "\n".join(lines)

    @property
    def problems(self) -> list[Problem]:
        """Every problem, as data: missing, shape, dtype, meta_nonpersistent, unexpected."""
        out = [Problem("missing", n, f"shape={self.shapes.get(n, '?')}", "",
                       self.planned.get(n)) for n in self.missing]
        out += [Problem("shape", n, str(a), str(b), self.planned.get(n))
                for n, a, b in self.shape_mismatches]
        out += [Problem("dtype", n, a, b) for n, a, b in self.dtype_mismatches]
        out += [Problem("meta_nonpersistent", n) for n in self.meta_nonpersistent]
        out += [Problem("unexpected", n) for n in self.unexpected]
        return out

    def problem_lines(self, *, unexpected: Unexpected = "error") -> list[str]:
        return [str(p) for p in self.problems if p.kind != "unexpected" or unexpected != "ignore"]


ProblemKind = Literal["missing", "shape", "dtype", "meta_nonpersistent", "unexpected"]


@dataclass(frozen=True)
class Problem:
    """One disagreement between a model and a checkpoint: its kind, the model fqn (the
    checkpoint key for ``unexpected``), the model's side and the checkpoint's, and where the
    tensor was planned."""

    kind: ProblemKind
    name: str
    model: str = ""
    checkpoint: str = ""
    planned: str | None = None

    def __str__(self) -> str:
        where = f"  planned for {self.planned}" if self.planned else ""
        text = {
            "missing": f"missing from the checkpoint  {self.model}{where}",
            "shape": f"shape {self.model} in the model, {self.checkpoint} in the checkpoint"
                     f"{where}",
            "dtype": f"dtype {self.model} in the model, {self.checkpoint} in the checkpoint "
                     "(not a float cast)",
            "meta_nonpersistent": "non-persistent buffer on meta (no checkpoint can fill it)",
            "unexpected": "in the checkpoint, not in the model",
        }[self.kind]
        return f"{self.name!r:45} {text}"


def verify(
    model: nn.Module,
    checkpoint: str | os.PathLike | CheckpointIndex,
    *,
    key_map: Mapping[str, str] | None = None,
    plan: DevicePlan | None = None,
) -> VerifyReport:
    """Compare ``model`` with ``checkpoint`` (headers only): missing, unexpected, mismatched,
    tied. Reads no tensor data and changes nothing."""
    index = checkpoint if isinstance(checkpoint, CheckpointIndex) else read_index(checkpoint)
    tensors, nonpersistent = model_tensors(model)
    renamed = apply_key_map(index.entries, key_map)
    all_names = [n for t in tensors for n in t.names]
    match = match_keys(all_names, renamed)
    key_for: dict[str, str] = {}
    missing, kept, shapes_bad, dtypes_bad, used = [], [], [], [], set()
    conflicts: list[tuple[tuple[str, str], ...]] = []
    for tensor in tensors:
        hits = [match.model_to_ckpt[n] for n in tensor.names if n in match.model_to_ckpt]
        stored = [(n, renamed[match.model_to_ckpt[n]]) for n in tensor.names
                  if n in match.model_to_ckpt]
        if len({k for _, k in stored}) > 1:
            conflicts.append(tuple(stored))
        if not hits:
            real_buffer = not tensor.slot.is_param and not tensor.is_meta
            (kept if real_buffer else missing).append(tensor.fqn)
            continue
        key = renamed[hits[0]]
        used.update(renamed[h] for h in hits)
        entry = index.entries[key]
        if tuple(entry.shape) != tensor.shape:
            shapes_bad.append((tensor.fqn, tensor.shape, tuple(entry.shape)))
        elif _category(entry.dtype) != _category(tensor.dtype):
            dtypes_bad.append((tensor.fqn, _dt(tensor.dtype), _dt(entry.dtype)))
        key_for[tensor.fqn] = key
    nonpersistent_names = {s.fqn for s in nonpersistent}
    original_to_new = {old: new for new, old in renamed.items()}
    unexpected = tuple(k for k in index.entries if k not in used
                       and original_to_new.get(k, k) not in nonpersistent_names
                       and not _matches_nonpersistent(k, nonpersistent_names))
    return VerifyReport(
        checkpoint=str(index.files[0] if len(index.files) == 1 else index.root),
        model_class=type(model).__name__,
        n_files=len(index.files), n_checkpoint_tensors=len(index.entries),
        key_for=key_for, missing=tuple(missing), kept=tuple(kept), unexpected=unexpected,
        shape_mismatches=tuple(shapes_bad), dtype_mismatches=tuple(dtypes_bad),
        tied=tuple(t.names for t in tensors if len(t.names) > 1),
        meta_nonpersistent=tuple(s.fqn for s in nonpersistent if s.tensor.device.type == "meta"),
        prefix_change=match.prefix_change,
        planned=_planned(tensors, plan), shapes={t.fqn: t.shape for t in tensors},
        tie_hints=_tie_candidates(tensors, set(missing), key_for),
        tie_conflicts=tuple(conflicts),
    )


def _tie_candidates(
    tensors: list[ModelTensor], missing: set[str], loaded: Mapping[str, str]
) -> dict[str, str]:
    """Missing output projections that have the shape of a loaded embedding: likely an untied
    tie (the model declares one, the skeleton lost it)."""
    embeddings = {t.shape: t.fqn for t in tensors
                  if t.fqn in loaded and isinstance(t.slot.owner, nn.Embedding)}
    return {t.fqn: embeddings[t.shape] for t in tensors
            if t.fqn in missing and isinstance(t.slot.owner, nn.Linear) and t.shape in embeddings}


def _matches_nonpersistent(key: str, names: set[str]) -> bool:
    # a stale checkpoint may still hold e.g. 'rotary_emb.inv_freq' (under another prefix):
    # never expected, so not a problem either
    return any(key.endswith("." + n) or n.endswith("." + key) for n in names)


def _planned(tensors: list[ModelTensor], plan: DevicePlan | None) -> dict[str, str]:
    if plan is None:
        return {}
    out = {}
    for t in tensors:
        unit = plan.unit_of(t.fqn)
        if unit is not None:
            out[t.fqn] = placement_str(plan.placement_of(t.fqn))
    return out


def _category(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point:
        return "float"
    return "complex" if dtype.is_complex else "int"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def raise_for_problems(
    report: VerifyReport, *, missing: str, unexpected: Unexpected, n_ckpt_files: int
) -> None:
    """One error for every problem the policies do not accept; warnings for the rest."""
    if report.meta_nonpersistent:
        raise SkeletonError(
            f"{len(report.meta_nonpersistent)} non-persistent buffer(s) of {report.model_class} "
            "are on 'meta'; no checkpoint can fill them:\n"
            + format_problems([repr(n) for n in report.meta_nonpersistent])
            + "\nBuild the model inside bigload.init_empty_weights(), which keeps them real."
        )
    if unexpected == "warn" and report.unexpected:
        logger.warning("%d tensor(s) of checkpoint %r were not used when loading %s: %s",
                       len(report.unexpected), report.checkpoint, report.model_class,
                       ", ".join(report.unexpected[:10]))
    blocking = [p for p in report.problems
                if (p.kind != "unexpected" or unexpected == "error")
                and (p.kind != "missing" or missing == "error")]
    if not blocking:
        return
    only_missing = all(p.kind == "missing" for p in blocking)
    cls = MissingWeightsError if only_missing else CheckpointMismatchError
    raise cls(
        f"{len(blocking)} problem(s) between {report.model_class} and checkpoint "
        f"{report.checkpoint!r} ({n_ckpt_files} file(s), {report.n_checkpoint_tensors} tensors):\n"
        + format_problems([str(p) for p in blocking]) + "\nNothing was loaded."
        + _advice(report, missing),
        problems=blocking,
    )


def _advice(report: VerifyReport, missing: str) -> str:
    tips = []
    if report.missing and missing == "error":
        tips.append(_tie_hint(report))
        tips.append("to initialise missing tensors instead, pass missing='init' (the module's "
                    "own initialisation) or missing='zeros'")
    if report.shape_mismatches:
        tips.append("a shape mismatch means the model's config differs from the checkpoint's")
    if report.unexpected and report.missing:
        tips.append(prefix_hint(list(report.missing), list(report.unexpected)).strip())
    text = "; ".join(t.rstrip(".") for t in tips if t)
    return f" {text[0].upper()}{text[1:]}." if text else ""


def _tie_hint(report: VerifyReport) -> str:
    for name, embedding in report.tie_hints.items():
        return (f"{name!r} has the shape of the embedding {embedding!r}: if the model ties them, "
                "tie them before loading (model.tie_weights())")
    return ""
