"""Offloaded weights: the store the loader fills and dispatch pages from (``store``), and the
folders that hold tensors converted for the disk tier (``folder``)."""

from __future__ import annotations

from .folder import (
    FINGERPRINT_FILE,
    OffloadItem,
    file_identity,
    serve_from_folder,
    stored_views,
    value_digest,
)
from .store import OffloadStore, StoredTensor, Tier

__all__ = [
    "FINGERPRINT_FILE",
    "OffloadItem",
    "OffloadStore",
    "StoredTensor",
    "Tier",
    "file_identity",
    "serve_from_folder",
    "stored_views",
    "value_digest",
]
