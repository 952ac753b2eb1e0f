"""torch pickles (``.bin``, ``.pt``, ``.pth``): ``data.pkl`` unpickled by torch's own weights-only
unpickler, but with storages served by bigload from checked zip records only (not by
``torch.load``). So no arbitrary object is built, nothing is allocated that the file does not
hold, no stored tensor byte is copied, and indexing reads no tensor data at all."""

from __future__ import annotations

import io
import logging
import pickle
import pickletools
import reprlib
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import _weights_only_unpickler

from bigload.errors import BigloadError, CorruptCheckpointError, UnsafeCheckpointError

from ._torch_zip import TorchArchive, corrupt, open_archive
from ._types import FileHeader, FileIdentity, TensorEntry

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# Training scripts save a whole checkpoint dict; the weights sit under one of these keys.
_WRAPPER_KEYS = ("state_dict", "model")
# data.pkl of ~140,000 tensors: unpickling runs in Python (~5 s per 50,000 tensors on a slow core)
MAX_PICKLE_BYTES = 16 * 1024 * 1024
# What a state dict's pickle names. torch's weights-only unpickler allows more (tensor classes
# such as torch.FloatTensor(n), bytearray(n), quantized and sparse rebuilds), all of which can
# allocate what the pickle asks for, not what the file holds.
_GLOBALS = {
    "collections": {"OrderedDict", "Counter"},
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                     "_rebuild_parameter", "_rebuild_parameter_with_state"},
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch.nn.parameter": {"Parameter"},
    "torch.storage": {"UntypedStorage"},
    "torch": {"Tensor", "Size", "device"},
    "_codecs": {"encode"},
    "builtins": {"set", "complex"},
}  # fmt: skip


def read_torch_header(path: Path) -> FileHeader:
    """Entries (dtype, shape; no byte ranges) and identity of one torch file; no data is read."""
    archive = open_archive(path)
    try:
        state_dict, notes = _state_dict(archive, with_data=False)
    finally:
        archive.close()
    entries = [
        TensorEntry(name, path, t.dtype, tuple(t.shape), None) for name, t in state_dict.items()
    ]
    return FileHeader(path, "torch", entries, notes=notes, identity=archive.identity)


def load_state_dict(
    path: Path, expected: FileIdentity | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The file's tensors (CPU; stored records are views of a private map) by name, and notes on
    what was unwrapped or skipped. With ``expected``, only if the file is still that one."""
    archive = open_archive(path, expected)
    try:
        return _state_dict(archive, with_data=True)
    finally:
        archive.close()  # the map stays while the tensors view it


def _state_dict(
    archive: TorchArchive, *, with_data: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    data = _pickle_bytes(archive)
    _check_globals(archive.path, data)
    storages = _Storages(archive, with_data=with_data)
    obj, notes = _unwrap(archive.path, _unpickle(archive.path, data, storages))
    tensors = _tensors(archive.path, obj, notes)
    storages.check_backed(tensors)
    return tensors, notes


def _pickle_bytes(archive: TorchArchive) -> bytes:
    record = archive.record("data.pkl")
    if record.size > MAX_PICKLE_BYTES:
        raise CorruptCheckpointError(
            f"torch file '{archive.path}': its pickle is {record.size} bytes, more than bigload "
            f"unpickles ({MAX_PICKLE_BYTES}). If the file is not corrupt, convert it with "
            "safetensors.torch.save_file (or save it in shards)."
        )
    return archive.read(record)


def _check_globals(path: Path, data: bytes) -> None:
    """Refuse a pickle naming any global outside ``_GLOBALS``, torch dtypes and storage types,
    before anything is unpickled (the opcodes are read, not run)."""
    try:
        named = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    except (ValueError, EOFError, OverflowError, IndexError) as err:
        raise corrupt(path, f"its pickle is malformed ({err})") from err
    refused = sorted(name for name in named if not _allowed(*name.partition(" ")[::2]))
    if refused:
        reason = pickle.UnpicklingError(f"refused globals: {', '.join(refused)}")
        raise UnsafeCheckpointError(
            f"torch file '{path}' holds objects that bigload does not unpickle "
            f"({', '.join(n.replace(' ', '.') for n in refused[:5])}). bigload never unpickles "
            "arbitrary objects: if you trust the file, load it yourself and save its state dict "
            "with safetensors.torch.save_file."
        ) from reason


def _allowed(module: str, name: str) -> bool:
    if name in _GLOBALS.get(module, ()):
        return True
    if module != "torch":
        return False
    return name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)


class _Unpickler(_weights_only_unpickler.Unpickler):
    """torch's weights-only unpickler, with storages from :class:`_Storages`."""

    def __init__(self, data: bytes, storages: _Storages):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._storages = storages

    def persistent_load(self, pid: object) -> torch.TypedStorage:
        return self._storages.get(pid)


def _unpickle(path: Path, data: bytes, storages: _Storages) -> object:
    try:
        return _Unpickler(data, storages).load()
    except BigloadError:
        raise
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"torch file '{path}' holds objects that torch.load(weights_only=True) refuses "
            f"({_reason(err)}). bigload never unpickles arbitrary objects: if you trust the file, "
            "load it yourself and save its state dict with safetensors.torch.save_file."
        ) from err
    except Exception as err:  # hostile opcodes make the unpickler and torch raise anything
        raise corrupt(path, f"its pickle does not unpickle ({type(err).__name__}: "
                            f"{reprlib.repr(str(err))})") from err  # fmt: skip


def _reason(err: Exception) -> str:
    """The line of torch's long weights_only message that names the refused object."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "WeightsUnpickler error" in line]
    return (named or lines or [type(err).__name__])[0].split(". Please use")[0]


class _Storages:
    """The storages a pickle asks for, each from its own record and exactly its size (meta
    storages when only the index is read)."""

    def __init__(self, archive: TorchArchive, *, with_data: bool):
        self.archive, self.with_data = archive, with_data
        self.served: dict[str, torch.TypedStorage] = {}
        self.specs: dict[str, tuple[torch.dtype, int]] = {}
        self.swap = _byteorder(archive) != sys.byteorder

    def get(self, pid: object) -> torch.TypedStorage:
        dtype, key, numel = _storage_id(self.archive.path, pid)
        nbytes = numel * dtype.itemsize
        if key not in self.served:
            untyped = self._untyped(key, dtype, nbytes)
            self.served[key] = torch.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
            self.specs[key] = (dtype, nbytes)
        elif self.specs[key] != (dtype, nbytes):
            raise corrupt(self.archive.path, f"storage {key!r} is named as two dtypes or sizes")
        return self.served[key]

    def _untyped(self, key: str, dtype: torch.dtype, nbytes: int) -> torch.UntypedStorage:
        record = self.archive.record(f"data/{key}")
        if record is None or record.size != nbytes:
            holds = "is missing" if record is None else f"holds {record.size} bytes"
            raise corrupt(self.archive.path, f"record 'data/{key}' {holds}, but the pickle asks "
                                             f"for a {dtype} storage of {nbytes} bytes")
        if not self.with_data:
            return torch.UntypedStorage(nbytes, device="meta")
        storage = self.archive.storage(record)
        misaligned = record.stored and record.start % dtype.itemsize
        if misaligned or (self.swap and dtype.itemsize > 1):
            storage = torch.UntypedStorage(nbytes).copy_(storage)  # torch.save aligns; others not
        if self.swap and dtype.itemsize > 1:
            storage.byteswap(dtype)
        return storage

    def check_backed(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Every tensor must view a storage of the file, not memory the pickle allocated."""
        ours = {s._untyped_storage._cdata for s in self.served.values()}
        loose = [name for name, t in tensors.items() if t.untyped_storage()._cdata not in ours]
        if loose:
            raise corrupt(self.archive.path, f"tensor(s) {reprlib.repr(loose)} are not stored "
                                             "in the file (the pickle builds them)")


def _storage_id(path: Path, pid: object) -> tuple[torch.dtype, str, int]:
    """``(dtype, key, numel)`` of a persistent id ``('storage', type, key, location, numel)``."""
    if type(pid) is tuple and len(pid) == 5:
        _, storage_type, key, _, numel = pid
        dtype = (torch.uint8 if storage_type is torch.UntypedStorage
                 else getattr(storage_type, "dtype", None))  # fmt: skip
        counts = type(numel) is int and numel >= 0
        if isinstance(dtype, torch.dtype) and type(key) is str and counts:
            return dtype, key, numel
    raise corrupt(path, f"its pickle names a storage as {reprlib.repr(pid)}")


def _byteorder(archive: TorchArchive) -> str:
    record = archive.record("byteorder")
    if record is None:
        return "little"  # what torch.load assumes
    order = archive.read(record) if record.size <= 16 else b""
    if order not in (b"little", b"big"):
        raise corrupt(archive.path, f"its byteorder record says {order[:16]!r}")
    return order.decode()


def _unwrap(path: Path, obj: object) -> tuple[object, list[str]]:
    if not isinstance(obj, Mapping):
        return obj, []
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            note = f"read the state dict under key '{key}' of '{path}'"
            logger.info(note)
            return obj[key], [note]
    return obj, []


def _tensors(path: Path, obj: object, notes: list[str]) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CorruptCheckpointError(
            f"torch file '{path}' holds a {type(obj).__name__}, not a state dict (name -> "
            "tensor). Save `model.state_dict()` instead."
        )
    tensors, skipped = {}, []
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            skipped.append(reprlib.repr(key))
    if skipped:
        notes.append(f"skipped {len(skipped)} non-tensor entries of '{path}': {', '.join(skipped)}")
        logger.info(notes[-1])
    return tensors
