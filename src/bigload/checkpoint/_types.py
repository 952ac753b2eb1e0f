"""The data the checkpoint index hands to the other stages: one entry per stored tensor.

Defined here (not in ``index.py``) so that the per-format header readers can build entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import torch

Format = Literal["safetensors", "torch"]


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor lives: its file, dtype, shape and (safetensors) absolute bytes."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    byte_range: tuple[int, int] | None  # absolute [start, end) in `file`; None for torch pickles

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class FileIdentity:
    """What one checkpoint file was when it was indexed. A reader compares it with the file it
    opens and refuses a file that changed (:class:`~bigload.errors.CheckpointChangedError`).

    ``content_id`` identifies the content by what was read, not by file-system metadata: the
    sha256 of the file's size and its header bytes (the safetensors header; for a torch zip, its
    central directory, which holds every record's CRC-32). A copy made with ``cp -p`` or
    ``rsync -t`` keeps size and mtime, not a ``content_id`` of other content. ``ctime_ns``
    changes on every write (and ``utime``, ``chmod``) and cannot be set by users: a rewrite that
    restores the mtime and keeps the header still differs in it.
    """

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int
    content_id: str


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of a checkpoint (name -> entry, in file order), read from headers only."""

    root: Path
    format: Format
    files: tuple[Path, ...]
    entries: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]
    notes: tuple[str, ...] = ()
    total_bytes: int = 0
    # file -> what it was when indexed; readers refuse a file that no longer matches
    identities: Mapping[Path, FileIdentity] = field(default_factory=lambda: MappingProxyType({}))

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"'{name}' is not in checkpoint '{self.root}'") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class FileHeader:
    """What one checkpoint file holds, as read by a format reader (internal)."""

    file: Path
    format: Format
    entries: list[TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    identity: FileIdentity | None = None
