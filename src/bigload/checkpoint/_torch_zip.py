"""The zip archive that ``torch.save`` writes (torch >= 1.6), read from a private map of the file.

Its record table is checked against the file (local headers, sizes, overlaps, compression) before
any record is used, so a record never claims bytes the file does not hold; deflated records (a
valid zip, written by some tools) are decompressed instead of being read as raw bytes.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from bigload.errors import CorruptCheckpointError

from ._files import check_content, file_identity, open_regular, open_unchanged, os_error
from ._types import FileIdentity

_LOCAL = struct.Struct("<4s5H3L2H")  # a zip local file header (30 bytes)
_LOCAL_MAGIC = b"PK\x03\x04"
_DEFLATE_MAX_RATIO = 1032  # deflate never expands its input more than this
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
# zipfile, struct and zlib report a malformed archive with any of these
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, EOFError, struct.error, OSError,
              OverflowError, NotImplementedError, RuntimeError, KeyError, IndexError)  # fmt: skip
_FIX = "It is truncated or corrupted; download or save it again."


def corrupt(path: Path, problem: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"torch file '{path}' cannot be read: {problem}. {_FIX}")


@dataclass(frozen=True)
class Record:
    """One record of the archive: where its bytes start in the file and how many it yields."""

    name: str
    start: int
    size: int
    stored: bool


class TorchArchive:
    """One torch zip file, checked; read through its file, and mapped copy-on-write only when a
    stored record's storage is asked for. Those storages are zero-copy views of the map (they
    keep it alive); deflated records are decompressed copies. ``close`` after unpickling."""

    def __init__(self, path: Path, f: BinaryIO, identity: FileIdentity, zf: zipfile.ZipFile):
        self.path, self.identity = path, identity
        self._file, self._zf = f, zf
        self._base: torch.UntypedStorage | None = None
        self.prefix, self.records = _records(path, zf, f.fileno())

    def record(self, name: str) -> Record | None:
        """The record ``name`` under the archive's folder (``"data.pkl"``, ``"data/0"``)."""
        return self.records.get(f"{self.prefix}/{name}")

    def read(self, record: Record) -> bytes:
        """The bytes of ``record`` (decompressed, CRC-checked)."""
        try:
            return self._zf.read(record.name)
        except ZIP_ERRORS as err:
            raise corrupt(self.path, f"record '{record.name}' does not read back ({err})") from err

    def storage(self, record: Record) -> torch.UntypedStorage:
        """A CPU storage of ``record``'s bytes: a view of the map when stored."""
        if record.size == 0:
            return torch.UntypedStorage(0)
        if not record.stored:
            data = bytearray(self.read(record))
            return torch.frombuffer(data, dtype=torch.uint8).untyped_storage()
        if self._base is None:
            # the memoryview a tensor keeps holds the map open while any view of it lives
            base = torch.frombuffer(memoryview(_map(self.path, self._file)), dtype=torch.uint8)
            self._base = base.untyped_storage()
        return self._base[record.start : record.start + record.size]

    def close(self) -> None:
        """Close the file; the map (if any) goes with the last storage that views it."""
        self._zf.close()
        self._file.close()
        self._base = None


def open_archive(path: Path, expected: FileIdentity | None = None) -> TorchArchive:
    """The checked archive at ``path``; with ``expected``, refused unless it is still the file
    that was indexed (stat and central directory)."""
    fd, st = open_regular(path) if expected is None else open_unchanged(path, expected)
    f = os.fdopen(fd, "rb")
    try:
        zf = _zipfile(path, f, st.st_size)
        found = file_identity(st, os.pread(fd, st.st_size - zf.start_dir, zf.start_dir))
        if expected is not None:
            check_content(path, expected, found.content_id)
        return TorchArchive(path, f, found, zf)
    except OSError as err:  # an I/O error while reading the directory or a local header
        f.close()
        raise os_error(path, err) from err
    except BaseException:
        f.close()
        raise


def _map(path: Path, f: BinaryIO) -> mmap.mmap:
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as err:
        raise corrupt(path, f"it cannot be mapped ({err})") from err


def _zipfile(path: Path, f: BinaryIO, size: int) -> zipfile.ZipFile:
    if size == 0:
        raise corrupt(path, "the file is empty")
    try:
        return zipfile.ZipFile(f)
    except ZIP_ERRORS as err:
        raise CorruptCheckpointError(
            f"torch file '{path}' is not a zip checkpoint of torch.save (torch >= 1.6): it is "
            "corrupted, or in the legacy format that cannot be memory-mapped. Re-save it with "
            "torch.save, or convert it with safetensors.torch.save_file."
        ) from err


def _records(path: Path, zf: zipfile.ZipFile, fd: int) -> tuple[str, dict[str, Record]]:
    """The archive's folder name and its records, every one checked against the file."""
    infos = zf.infolist()
    names = [info.filename for info in infos]
    if not infos or len(set(names)) != len(names):
        raise corrupt(path, "its zip directory is empty or names a record twice")
    prefix = names[0].split("/")[0]
    if any(not name.startswith(f"{prefix}/") for name in names) or (
        f"{prefix}/data.pkl" not in names
    ):
        raise corrupt(path, f"its records are not one folder holding '{prefix}/data.pkl'")
    records = {info.filename: _record(path, info, fd, zf.start_dir) for info in infos}
    _check_disjoint(path, infos, records)
    return prefix, records


def _record(path: Path, info: zipfile.ZipInfo, fd: int, end: int) -> Record:
    """``info`` checked against its local header: method, name, and bytes inside the file."""
    method = _METHODS.get(info.compress_type)
    if method is None or info.flag_bits & 0x1:
        raise corrupt(path, f"record '{info.filename}' is encrypted or compressed with method "
                            f"{info.compress_type} (torch reads stored or deflated records)")
    at = info.header_offset
    local = os.pread(fd, _LOCAL.size, at) if 0 <= at <= end - _LOCAL.size else b""
    if len(local) != _LOCAL.size:
        raise corrupt(path, f"record '{info.filename}' starts past the end of its data")
    magic, _, _, local_method, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack(local)
    start = at + _LOCAL.size + name_len + extra_len
    raw_name = os.pread(fd, name_len, at + _LOCAL.size)
    if magic != _LOCAL_MAGIC or local_method != info.compress_type or raw_name != _raw_name(info):
        raise corrupt(path, f"the local header of record '{info.filename}' does not match "
                            "the zip directory")  # fmt: skip
    if start + info.compress_size > end or not _size_possible(info):
        raise corrupt(path, f"record '{info.filename}' says {info.compress_size} bytes "
                            f"({info.file_size} once read), which the file does not hold")
    return Record(info.filename, start, info.file_size, method == "stored")


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    return info.orig_filename.encode(encoding, errors="surrogateescape")


def _size_possible(info: zipfile.ZipInfo) -> bool:
    if info.compress_type == zipfile.ZIP_STORED:
        return info.file_size == info.compress_size
    return info.file_size <= _DEFLATE_MAX_RATIO * (info.compress_size + 1)


def _check_disjoint(path: Path, infos: list[zipfile.ZipInfo], records: dict[str, Record]) -> None:
    spans = sorted(
        (info.header_offset, records[info.filename].start + info.compress_size, info.filename)
        for info in infos
    )
    for (_, end, name), (start, _, following) in zip(spans, spans[1:]):
        if start < end:
            raise corrupt(path, f"records '{name}' and '{following}' overlap")
