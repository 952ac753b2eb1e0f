"""Offloaded weights: the store the loader fills and dispatch pages from (``store``), and the
folders that hold tensors converted for the disk tier (``folder``: packs of content-keyed
tensors, reused by every later load that needs them)."""

from __future__ import annotations

from .access import LOCK_FILE
from .folder import OffloadItem, Served, serve_from_folder, stored_views
from .sources import MANIFEST_FILE
from .store import OffloadStore, StoredTensor, Tier

__all__ = [
    "LOCK_FILE",
    "MANIFEST_FILE",
    "OffloadItem",
    "OffloadStore",
    "Served",
    "StoredTensor",
    "Tier",
    "serve_from_folder",
    "stored_views",
]
