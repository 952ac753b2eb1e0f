"""The data the checkpoint index hands to the other stages: one entry per stored tensor.

Defined here (not in ``index.py``) so that the per-format header readers can build entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
class CheckpointIndex:
    """Every tensor of a checkpoint (name -> entry, in file order), read from headers only."""

    root: Path
    format: Format
    files: tuple[Path, ...]
    entries: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]
    notes: tuple[str, ...] = ()
    total_bytes: int = 0

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
