"""Checkpoints: ``read_index`` (headers only: name -> file, dtype, shape, bytes) and
``CheckpointReader`` (zero-copy tensors from memory-mapped files)."""

from __future__ import annotations

from ._files import open_unchanged, rewritten_in_place
from ._types import FileIdentity
from .index import CheckpointIndex, TensorEntry, read_index
from .reader import CheckpointReader, open_reader

__all__ = [
    "CheckpointIndex",
    "CheckpointReader",
    "FileIdentity",
    "TensorEntry",
    "open_reader",
    "open_unchanged",
    "read_index",
    "rewritten_in_place",
]
