"""safetensors headers, parsed by hand and checked: 8-byte little-endian length N, a JSON header,
then the tensor bytes from offset 8 + N. Nothing past the header is read."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from bigload.errors import CorruptCheckpointError, format_problems

from ._types import FileHeader, TensorEntry

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}  # fmt: skip
# Only the dtypes this torch build has (uint16/32/64 arrived in torch 2.3).
DTYPES: dict[str, torch.dtype] = {
    key: getattr(torch, name) for key, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}
_FIX = "The file is truncated or corrupted; download or save it again."


def read_safetensors_header(path: Path) -> FileHeader:
    """Entries (absolute byte ranges, in file order) and ``__metadata__`` of one file."""
    size = path.stat().st_size
    header, data_start = _load_header(path, size)
    metadata = _metadata(path, header.pop("__metadata__", None))
    problems = [p for name, raw in header.items() if (p := _problem(name, raw, data_start, size))]
    if problems:
        _raise(path, problems)
    entries = [_entry(path, name, raw, data_start) for name, raw in header.items()]
    entries.sort(key=lambda e: e.byte_range)
    overlaps = _overlaps(entries)
    if overlaps:
        _raise(path, overlaps)
    return FileHeader(path, "safetensors", entries, metadata)


def _load_header(path: Path, size: int) -> tuple[dict, int]:
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 0 or length > MAX_HEADER_BYTES or 8 + length > size:
            raise CorruptCheckpointError(
                f"safetensors file '{path}' ({size} bytes) is not valid: its header length "
                f"{'is missing' if length < 0 else f'says {length} bytes'}, which does not fit "
                f"the file (limit {MAX_HEADER_BYTES} bytes). {_FIX}"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise CorruptCheckpointError(
            f"safetensors file '{path}': its {length}-byte header is not valid JSON ({err}). {_FIX}"
        ) from err
    if not isinstance(header, dict):
        raise CorruptCheckpointError(
            f"safetensors file '{path}': its header is not a JSON object. {_FIX}"
        )
    return header, 8 + length


def _metadata(path: Path, raw: object) -> dict[str, str]:
    if not isinstance(raw, dict):
        logger.info("'%s' has no usable __metadata__; reading its tensors as plain tensors", path)
        return {}
    metadata = {str(key): str(value) for key, value in raw.items()}
    if metadata.get("format", "pt") != "pt":
        logger.info(
            "'%s' was written with format=%r; reading its tensors as plain tensors",
            path, metadata["format"],
        )  # fmt: skip
    return metadata


def _problem(name: str, raw: object, data_start: int, size: int) -> str | None:
    """What is wrong with one header entry, or None."""
    field_problem = _field_problem(raw)
    if field_problem:
        return f"'{name}': {field_problem}"
    dtype = DTYPES[raw["dtype"]]
    start, end = raw["data_offsets"]
    needed = math.prod(raw["shape"]) * dtype.itemsize
    if end - start != needed:
        return (
            f"'{name}': data_offsets [{start}, {end}) hold {end - start} bytes, but dtype "
            f"{raw['dtype']} shape {tuple(raw['shape'])} needs {needed}"
        )
    if data_start + end > size:
        return f"'{name}': ends at byte {data_start + end}, but the file has {size} (truncated)"
    return None


def _field_problem(raw: object) -> str | None:
    if not isinstance(raw, dict) or not {"dtype", "shape", "data_offsets"} <= raw.keys():
        return "entry lacks 'dtype', 'shape' or 'data_offsets'"
    if raw["dtype"] not in DTYPES:
        return f"unknown dtype {raw['dtype']!r} (known: {', '.join(DTYPES)})"
    shape, offsets = raw["shape"], raw["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        return f"data_offsets {offsets!r} is not [start, end] of non-negative integers"
    if offsets[0] > offsets[1]:
        return f"data_offsets {offsets!r} end before they start"
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, raw: dict, data_start: int) -> TensorEntry:
    start, end = raw["data_offsets"]
    byte_range = (data_start + start, data_start + end)
    return TensorEntry(name, path, DTYPES[raw["dtype"]], tuple(raw["shape"]), byte_range)


def _overlaps(entries: list[TensorEntry]) -> list[str]:
    """Tensors whose bytes overlap (entries sorted by start; empty tensors overlap nothing)."""
    problems, previous = [], None
    for entry in (e for e in entries if e.nbytes):
        if previous is not None and entry.byte_range[0] < previous.byte_range[1]:
            problems.append(
                f"'{entry.name}' bytes {list(entry.byte_range)} overlap "
                f"'{previous.name}' bytes {list(previous.byte_range)}"
            )
        if previous is None or entry.byte_range[1] > previous.byte_range[1]:
            previous = entry
    return problems


def _raise(path: Path, problems: list[str]) -> None:
    raise CorruptCheckpointError(
        f"safetensors file '{path}' is corrupt: its header does not match its data "
        f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n"
        f"{format_problems(problems)}\n{_FIX}"
    )
