"""Packs: the safetensors files bigload writes into an offload folder. Each tensor is named by
its content key (``<position>.<key>``), so a pack says by its header alone what it holds.

A pack is written to a temporary name in the folder, fsynced and renamed: it exists complete or
not at all. Its suffix is ``.pack``, not ``.safetensors``, so that a checkpoint folder used as
the offload folder never reads a pack as one of its weight files.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from ..checkpoint import CheckpointIndex, TensorEntry
from ..checkpoint._safetensors import DTYPES, read_safetensors_header
from ..errors import CorruptCheckpointError, OffloadError
from ..sizes import tensor_nbytes
from .access import folder_error, sync_folder

logger = logging.getLogger(__name__)

PACK_GLOB = "bigload-pack-*.pack"
KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_NAME_PATTERN = re.compile(r"^[0-9a-f]{8}\.([0-9a-f]{64})$")
_METADATA = {"format": "pt", "writer": "bigload offload pack", "version": "1"}
_SAFETENSORS_NAME = {dtype: code for code, dtype in DTYPES.items()}
_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Pack:
    """A valid pack: its headers as a checkpoint index, and which tensor holds each key."""

    path: Path
    index: CheckpointIndex
    names: Mapping[str, str]  # content key -> tensor name in the pack


@dataclass(frozen=True)
class PackSpec:
    """One tensor to write: its dtype and shape, and ``produce`` returning its values and
    content key (known only once the values were read)."""

    label: str  # for messages: the model's fqn
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], tuple[torch.Tensor, str]]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


# --- reading ------------------------------------------------------------------------------------
def read_packs(folder: Path) -> list[Pack]:
    """Every valid pack of ``folder``, in name order. A pack that does not validate is logged
    and ignored (never served, never removed)."""
    packs = []
    for path in sorted(folder.glob(PACK_GLOB)):
        try:
            packs.append(read_pack(path))
        except (OSError, CorruptCheckpointError, _Invalid) as err:
            logger.warning("ignoring '%s': it is not a complete pack bigload wrote (%s); its "
                           "tensors are converted again. Delete it to silence this.", path, err)
    return packs


class _Invalid(Exception):
    """A pack file whose header or size does not validate."""


def read_pack(path: Path) -> Pack:
    """The pack at ``path``, from its header; raises when the header, the names or the file
    size do not match what bigload writes."""
    header = read_safetensors_header(path)
    if any(header.metadata.get(k) != v for k, v in _METADATA.items()):
        raise _Invalid(f"its metadata is {header.metadata}, not a bigload pack's")
    names = {}
    for entry in header.entries:
        found = _NAME_PATTERN.match(entry.name)
        if found is None:
            raise _Invalid(f"tensor name {entry.name!r} is not '<position>.<key>'")
        names.setdefault(found.group(1), entry.name)
    _check_size(path, header.entries)
    index = CheckpointIndex(
        root=path.parent, format="safetensors", files=(path,),
        entries=MappingProxyType({e.name: e for e in header.entries}),
        metadata=MappingProxyType(header.metadata),
        total_bytes=sum(e.nbytes for e in header.entries))
    return Pack(path, index, MappingProxyType(names))


def _check_size(path: Path, entries: Sequence[TensorEntry]) -> None:
    with open(path, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
    expected = data_start + sum(e.nbytes for e in entries)
    size = path.stat().st_size
    if size != expected:
        raise _Invalid(f"it has {size} bytes, its header describes {expected}")


# --- writing ------------------------------------------------------------------------------------
def write_pack(folder: Path, specs: Sequence[PackSpec]) -> tuple[Pack, list[str]]:
    """Write ``specs`` as one new pack of ``folder``; returns it and each spec's key.

    Every tensor name has the same length, so the header's length is known before any value is
    read: a placeholder header is written first, the values after it (each key computed while
    its values are produced), the real header last; then fsync and rename. On any failure the
    temporary file is removed; a full filesystem is an OffloadError with the bytes needed."""
    order = sorted(range(len(specs)), key=lambda i: -specs[i].dtype.itemsize)  # aligned offsets
    placeholder = _header(specs, order, ["0" * 64] * len(specs))
    size = len(placeholder) + sum(s.nbytes for s in specs)
    check_room(folder, size, len(specs))
    token = secrets.token_hex(8)
    tmp, final = folder / f".bigload-pack-{token}.tmp", folder / f"bigload-pack-{token}.pack"
    failed = _Failure(folder, tmp, size, len(specs))
    try:
        keys = _write(tmp, specs, order, placeholder, failed)
        with failed("renaming the pack into place"):
            os.rename(tmp, final)
            sync_folder(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return read_pack(final), keys


class _Failure:
    """``with failed(doing):`` around a write to the folder: an OSError becomes an
    OffloadError naming the folder (the temporary file removed first, so that the free bytes
    reported are true); errors of reading the values pass as they are."""

    def __init__(self, folder: Path, tmp: Path, size: int, count: int):
        self.folder, self.tmp, self.size, self.count = folder, tmp, size, count

    @contextmanager
    def __call__(self, doing: str) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            self.tmp.unlink(missing_ok=True)
            if err.errno in _FULL:
                raise _full(self.folder, self.size, self.count) from err
            raise folder_error(self.folder, err, doing) from err


def _write(tmp: Path, specs: Sequence[PackSpec], order: list[int], placeholder: bytes,
           failed: _Failure) -> list[str]:
    keys = [""] * len(specs)
    with failed("creating a pack"):
        f = open(tmp, "xb")  # noqa: SIM115 - closed below, errors of each step told apart
    with f:
        with failed("writing a pack"):
            f.write(placeholder)
        for i in order:
            data = _produced(specs[i], keys, i)
            with failed("writing a pack"):
                f.write(data)
        header = _header(specs, order, keys)
        if len(header) != len(placeholder):  # keys are validated: this cannot happen
            raise RuntimeError("pack header changed length")
        with failed("writing a pack"):
            f.seek(0)
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
    return keys


def _produced(spec: PackSpec, keys: list[str], i: int) -> memoryview:
    tensor, key = spec.produce()
    tensor = tensor.detach().to("cpu", spec.dtype).contiguous()
    if tuple(tensor.shape) != tuple(spec.shape):
        raise OffloadError(f"offload of {spec.label!r}: its values have shape "
                           f"{tuple(tensor.shape)}, the model expects {spec.shape}")
    if not KEY_PATTERN.match(key):
        raise ValueError(f"content key {key!r} of {spec.label!r} is not 64 hex digits")
    keys[i] = key
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _header(specs: Sequence[PackSpec], order: list[int], keys: list[str]) -> bytes:
    header: dict[str, object] = {"__metadata__": _METADATA}
    offset = 0
    for position, i in enumerate(order):
        spec = specs[i]
        header[f"{position:08x}.{keys[i]}"] = {
            "dtype": _SAFETENSORS_NAME[spec.dtype], "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def check_room(folder: Path, size: int, count: int) -> None:
    """Refuse a pack of ``size`` bytes before writing it when the filesystem has less free."""
    if free_bytes(folder) < size:
        raise _full(folder, size, count)


def free_bytes(folder: Path) -> int:
    """Bytes this process may still write on ``folder``'s filesystem."""
    return shutil.disk_usage(folder).free


def _full(folder: Path, size: int, count: int) -> OffloadError:
    return OffloadError(
        f"offload folder '{folder}' has no room for the {count} converted tensor(s): they need "
        f"{size} bytes, its filesystem has {free_bytes(folder)} bytes free. Nothing was written "
        "and nothing was loaded. Free space there, or pass an offload_folder on a filesystem "
        "with room."
    )
