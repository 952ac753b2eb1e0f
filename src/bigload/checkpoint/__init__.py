"""Checkpoints: ``read_index`` (headers only: name -> file, dtype, shape, bytes) and
``CheckpointReader`` (zero-copy tensors from memory-mapped files)."""

from __future__ import annotations

from .index import CheckpointIndex, TensorEntry, read_index
from .reader import CheckpointReader, open_reader

__all__ = ["CheckpointIndex", "CheckpointReader", "TensorEntry", "open_reader", "read_index"]
