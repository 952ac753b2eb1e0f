"""safetensors headers, parsed by hand and checked: 8-byte little-endian length N, a JSON header,
then the tensor bytes from offset 8 + N. Nothing past the header is read."""

from __future__ import annotations

import logging
import math
import os
import reprlib
from pathlib import Path

import torch

from bigload.errors import CorruptCheckpointError, format_problems

from ._files import content_id, file_identity, open_regular, os_error
from ._json import MAX_JSON_BYTES, JsonProblem, no_gc, parse_object
from ._types import FileHeader, TensorEntry

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = MAX_JSON_BYTES
MAX_DIMS = 64  # torch takes more; no real checkpoint has more than a handful
_INT64_MAX = 2**63 - 1
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
    """Entries (absolute byte ranges, in file order) and ``__metadata__`` of one file, and the
    file's identity (stat and header bytes)."""
    fd, st = open_regular(path)
    try:
        with open(fd, "rb") as f:
            prefix, raw = _read_header(path, f, st.st_size)
    except OSError as err:  # an I/O error while reading
        raise os_error(path, err) from err
    header = _parse(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", None))
    entries = _entries(path, header, 8 + len(raw), st.st_size)
    return FileHeader(path, "safetensors", entries, metadata,
                      identity=file_identity(st, prefix, raw))  # fmt: skip


def file_content_id(fd: int, size: int) -> str | None:
    """The ``content_id`` :func:`read_safetensors_header` recorded, of the open file ``fd``
    (None when its header length does not fit). Read with ``pread``, not through a map: pages
    touched through a map stay mapped, and the kernel's read-around would map the first tensors
    with the header, out of reach of the offload tier's page dropping."""
    prefix = os.pread(fd, 8, 0)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if length < 0 or length > MAX_HEADER_BYTES or 8 + length > size:
        return None
    return content_id(size, prefix, os.pread(fd, length, 8))


def _read_header(path: Path, f, size: int) -> tuple[bytes, bytes]:
    prefix = f.read(8)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if length > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            f"safetensors file '{path}' ({size} bytes): its header length says {length} bytes, "
            f"more than bigload reads ({MAX_HEADER_BYTES} bytes, the headers of ~250,000 "
            "tensors). If the file is corrupt, download or save it again; if it really holds "
            "that many tensors, save it as shards (huggingface_hub.save_torch_state_dict with "
            "max_shard_size='5GB')."
        )
    if length < 0 or 8 + length > size:
        raise CorruptCheckpointError(
            f"safetensors file '{path}' ({size} bytes) is not valid: its header length "
            f"{'is missing' if length < 0 else f'says {length} bytes'}, which does not fit "
            f"the file. {_FIX}"
        )
    raw = f.read(length)
    if len(raw) != length:
        raise CorruptCheckpointError(
            f"safetensors file '{path}' ended while its {length}-byte header was read. {_FIX}"
        )
    return prefix, raw


def _parse(path: Path, raw: bytes) -> dict:
    try:
        return parse_object(raw)
    except JsonProblem as err:
        raise CorruptCheckpointError(
            f"safetensors file '{path}': its {len(raw)}-byte header is refused: {err}. {_FIX}"
        ) from err


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


def _entries(path: Path, header: dict, data_start: int, size: int) -> list[TensorEntry]:
    """Every tensor of the header, checked (all problems raised at once) and in file order."""
    with no_gc():
        checked = [_entry_or_problem(path, name, raw, data_start, size)
                   for name, raw in header.items()]  # fmt: skip
    problems = [item for item in checked if isinstance(item, str)]
    if problems:
        _raise(path, problems)
    entries = sorted(checked, key=lambda e: e.byte_range)
    overlaps = _overlaps(entries)
    if overlaps:
        _raise(path, overlaps)
    return entries


def _entry_or_problem(
    path: Path, name: str, raw: object, data_start: int, size: int
) -> TensorEntry | str:
    """The entry of one header item, or what is wrong with it."""
    problem = _field_problem(raw)
    if problem:
        return f"{_quoted(name)}: {problem}"
    dtype = DTYPES[raw["dtype"]]
    shape, (start, end) = raw["shape"], raw["data_offsets"]
    needed = math.prod(shape) * dtype.itemsize
    if end - start != needed:
        return (
            f"{_quoted(name)}: data_offsets [{start}, {end}) hold {end - start} bytes, but dtype "
            f"{raw['dtype']} shape {tuple(shape)} needs {needed}"
        )
    if data_start + end > size:
        return (f"{_quoted(name)}: ends at byte {data_start + end}, but the file has {size} "
                "(truncated)")  # fmt: skip
    return TensorEntry(name, path, dtype, tuple(shape), (data_start + start, data_start + end))


def _field_problem(raw: object) -> str | None:
    if type(raw) is not dict or not {"dtype", "shape", "data_offsets"} <= raw.keys():
        return "entry lacks 'dtype', 'shape' or 'data_offsets'"
    dtype, offsets = raw["dtype"], raw["data_offsets"]
    if type(dtype) is not str or dtype not in DTYPES:
        return f"unknown dtype {_short(dtype)} (known: {', '.join(DTYPES)})"
    shape_problem = _shape_problem(raw["shape"], DTYPES[dtype].itemsize)
    if shape_problem:
        return shape_problem
    if type(offsets) is not list or len(offsets) != 2 or not _counts(offsets):
        return f"data_offsets {_short(offsets)} is not [start, end] of non-negative integers"
    if offsets[0] > offsets[1]:
        return f"data_offsets {offsets!r} end before they start"
    return None


def _shape_problem(shape: object, itemsize: int) -> str | None:
    """Why ``shape`` is not a torch shape: non-negative ints, at most MAX_DIMS of them, whose
    sizes and strides (zero-size tensors included) fit torch's int64."""
    if type(shape) is not list or not _counts(shape):
        return f"shape {_short(shape)} is not a list of non-negative integers"
    if len(shape) > MAX_DIMS:
        return f"shape has {len(shape)} dimensions (bigload reads up to {MAX_DIMS})"
    if 0 in shape and math.prod(d or 1 for d in shape) * itemsize > _INT64_MAX:
        return f"shape {tuple(shape)} is too large for any tensor (over 2**63 bytes)"
    return None


def _counts(values: list) -> bool:
    """Whether ``values`` are ints (not bools) in 0..2**63-1 (set and min run in C: this runs
    for every tensor of a header)."""
    return not values or (set(map(type, values)) == {int} and 0 <= min(values)
                          and max(values) <= _INT64_MAX)  # fmt: skip


def _short(value: object) -> str:
    return reprlib.repr(value)  # a hostile header's values can be megabytes long


def _quoted(name: str) -> str:
    return f"'{name}'" if len(name) <= 200 else f"'{name[:197]}...'"


def _overlaps(entries: list[TensorEntry]) -> list[str]:
    """Tensors whose bytes overlap (entries sorted by start; empty tensors overlap nothing)."""
    problems, previous = [], None
    for entry in (e for e in entries if e.nbytes):
        if previous is not None and entry.byte_range[0] < previous.byte_range[1]:
            problems.append(
                f"{_quoted(entry.name)} bytes {list(entry.byte_range)} overlap "
                f"{_quoted(previous.name)} bytes {list(previous.byte_range)}"
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
