"""Bytes per tensor and per module, at the dtype they will be loaded in; pure, works on meta.

Floating tensors count at the target ``dtype``; integer and bool tensors at their own dtype.
A tensor reachable under several fqns (a tie) is counted once, at its first fqn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .devices import parse_dtype
from .errors import SizeError
from .slots import iter_slots, tensor_groups

TensorKind = Literal["parameter", "buffer"]
DtypeLike = torch.dtype | str

_SUB_BYTE_BITS = {f"uint{n}": n for n in range(1, 8)} | {f"int{n}": n for n in range(1, 8)}


@dataclass(frozen=True)
class TensorSize:
    """One distinct tensor of a model: every fqn it is reachable under and its bytes."""

    fqns: tuple[str, ...]
    size_bytes: int
    kind: TensorKind


def to_dtype(dtype: DtypeLike | None) -> torch.dtype | None:
    """``"float16"``, ``"torch.bfloat16"``, ``"bf16"`` or a torch.dtype → torch.dtype."""
    return parse_dtype(dtype)


def dtype_nbytes(dtype: DtypeLike) -> float:
    """Bytes of one element: 2 for float16, 0.5 for uint4 (sub-byte dtypes are fractional)."""
    dtype = to_dtype(dtype)
    bits = _SUB_BYTE_BITS.get(str(dtype).removeprefix("torch."))
    return bits / 8 if bits is not None else float(dtype.itemsize)


def tensor_nbytes(
    shape_or_tensor: torch.Tensor | Iterable[int], dtype: DtypeLike | None = None
) -> int:
    """Bytes of a tensor (or a shape) at ``dtype`` (default: the tensor's own dtype)."""
    if isinstance(shape_or_tensor, torch.Tensor):
        numel = shape_or_tensor.numel()
        dtype = shape_or_tensor.dtype if dtype is None else dtype
    else:
        numel = math.prod(shape_or_tensor)
    if dtype is None:
        raise SizeError("tensor_nbytes of a shape needs a dtype")
    return math.ceil(numel * dtype_nbytes(dtype))


def target_dtype(
    tensor_dtype: torch.dtype, dtype: torch.dtype | None, *, keep_fp32: bool = False
) -> torch.dtype:
    """The dtype a tensor is loaded in: floats follow ``dtype`` (fp32 when kept), others stay."""
    if not tensor_dtype.is_floating_point:
        return tensor_dtype
    if keep_fp32:
        return torch.float32
    return tensor_dtype if dtype is None else dtype


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor, TensorKind]]:
    """Every (fqn, tensor, kind) of ``model``, module by module, aliases included."""
    for slot in iter_slots(model):
        yield slot.fqn, slot.tensor, slot.kind  # type: ignore[misc]


def in_modules(fqn: str, modules: Iterable[str]) -> bool:
    """Whether ``fqn`` lies in one of ``modules`` (a module fqn or a name component)."""
    dotted = f".{fqn}."
    return any(fqn == m or fqn.startswith(f"{m}.") or f".{m}." in dotted for m in modules)


def tensor_sizes(
    model: nn.Module,
    *,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    keep_in_fp32_modules: Iterable[str] | None = None,
    overrides: Mapping[str, int] | None = None,
) -> list[TensorSize]:
    """The distinct tensors of ``model`` in registration order, each with its load-time bytes.

    ``overrides`` (fqn → bytes, e.g. from :func:`sizes_from_index`) replace the model's own
    shapes; for a tie, the first member with an override wins.
    """
    dtype = to_dtype(dtype)
    special = {k: to_dtype(v) for k, v in (special_dtypes or {}).items()}
    keep = tuple(keep_in_fp32_modules or ())
    result = []
    for group in tensor_groups(iter_slots(model)):
        fqns, tensor, kind = [s.fqn for s in group], group[0].tensor, group[0].kind
        size = _override(fqns, overrides)
        if size is None:
            to = special.get(fqns[0]) or target_dtype(
                tensor.dtype, dtype, keep_fp32=bool(keep) and in_modules(fqns[0], keep)
            )
            size = tensor_nbytes(tensor, to)
        result.append(TensorSize(tuple(fqns), size, kind))
    return result


def _override(fqns: list[str], overrides: Mapping[str, int] | None) -> int | None:
    if overrides:
        for fqn in fqns:
            if fqn in overrides:
                return int(overrides[fqn])
    return None


def compute_module_sizes(
    model: nn.Module,
    dtype: DtypeLike | None = None,
    special_dtypes: Mapping[str, DtypeLike] | None = None,
    buffers_only: bool = False,
) -> dict[str, int]:
    """Bytes per module fqn and per tensor fqn, ``""`` being the total (as accelerate's).

    Every module appears (0 when it holds nothing); an alias of a tied tensor counts 0.
    """
    entries = tensor_sizes(model, dtype=dtype, special_dtypes=special_dtypes)
    if buffers_only:
        entries = [e for e in entries if e.kind == "buffer"]
    sizes = dict.fromkeys((name for name, _ in model.named_modules(remove_duplicate=False)), 0)
    sizes.update(module_sizes(entries))
    for entry in entries:
        sizes.update(dict.fromkeys(entry.fqns[1:], 0))
    return sizes


def module_sizes(entries: Iterable[TensorSize]) -> dict[str, int]:
    """Bytes per prefix (``""``, each module, each tensor) of each tensor's first fqn."""
    sizes: dict[str, int] = {"": 0}
    for entry in entries:
        parts = entry.fqns[0].split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            sizes[prefix] = sizes.get(prefix, 0) + entry.size_bytes
        sizes[""] += entry.size_bytes
    return sizes


def sizes_from_index(index: Any, dtype: DtypeLike | None = None) -> dict[str, int]:
    """Bytes per tensor name of a checkpoint, at the load-time ``dtype``.

    ``index`` is a ``CheckpointIndex`` (its ``entries``), or a mapping name → ``(shape, dtype)``
    or name → object with ``.shape`` and ``.dtype``.
    """
    dtype = to_dtype(dtype)
    entries = getattr(index, "entries", index)
    result = {}
    for name, entry in entries.items():
        shape, stored = (entry.shape, entry.dtype) if hasattr(entry, "shape") else entry
        result[name] = tensor_nbytes(shape, target_dtype(to_dtype(stored), dtype))
    return result
