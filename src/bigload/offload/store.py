"""Where offloaded weights live: CPU memory, or mmap views of safetensors files (the checkpoint's
own, or an offload folder). Pages of disk-tier weights are fetched ahead of use by a background
thread and released after use."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..checkpoint import CheckpointReader, FileIdentity, rewritten_in_place
from ..errors import CheckpointChangedError
from ..pages import MADV_POPULATE_READ, advise
from ..sizes import tensor_nbytes

Tier = Literal["cpu", "disk"]


@dataclass
class StoredTensor:
    """One offloaded tensor: the real CPU tensor, and where its bytes are mapped from."""

    fqn: str
    tensor: torch.Tensor
    tier: Tier
    mm: mmap.mmap | None = None
    byte_range: tuple[int, int] | None = None
    version: int = 0
    file: Path | None = None  # the file ``byte_range`` is in (disk tier)
    identity: FileIdentity | None = None  # what that file was when it was indexed

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.tensor)


class OffloadStore:
    """Offloaded tensors by fqn, plus the readers that keep their maps alive. The loader fills
    it and hands it to dispatch; shared, not copied, by ``copy.deepcopy`` (it holds maps of
    read-only files)."""

    def __init__(self, prefetch_workers: int = 1):
        self.items: dict[str, StoredTensor] = {}
        self.readers: list[CheckpointReader] = []
        self.bytes_written = 0
        self._pool = ThreadPoolExecutor(max_workers=prefetch_workers,
                                        thread_name_prefix="bigload-prefetch")
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> OffloadStore:
        return self

    def add(self, item: StoredTensor) -> None:
        item.version = item.tensor._version
        self.items[item.fqn] = item

    def merge(self, other: OffloadStore) -> None:
        """Take ``other``'s tensors and readers (a later load or offload of the same model)."""
        self.items.update(other.items)
        self.readers.extend(other.readers)
        self.bytes_written += other.bytes_written

    def disk_bytes(self) -> int:
        return sum(i.nbytes for i in self.items.values() if i.tier == "disk")

    def prefetch(self, fqns: Iterable[str], *, map_pages: bool = True) -> None:
        """Start reading the pages of ``fqns`` (disk tier) in the background and map them
        (``MADV_POPULATE_READ``), so that the unit runs without page faults; with
        ``map_pages=False`` (or on kernels before 5.14) only into the page cache
        (``MADV_WILLNEED``)."""
        advice = (MADV_POPULATE_READ, mmap.MADV_WILLNEED) if map_pages else (mmap.MADV_WILLNEED,)
        for fqn in fqns:
            item = self.items.get(fqn)
            if item is None or item.mm is None or fqn in self._pending:
                continue
            with self._lock:
                self._pending[fqn] = self._pool.submit(advise, item.mm, item.byte_range, *advice)

    def wait(self, fqns: Iterable[str]) -> None:
        """Wait for prefetches of ``fqns`` still running (so a unit never races its reader)."""
        for fqn in fqns:
            with self._lock:
                future = self._pending.pop(fqn, None)
            if future is not None:
                future.result()

    def check_mapped(self, fqns: Iterable[str]) -> None:
        """Refuse to touch the mapped pages of ``fqns`` when their file was rewritten in place
        since it was indexed: the pages would hold other bytes, or none at all (a truncated
        file faults). A file replaced by a new one (a rename, a re-download) is harmless: the
        mapping keeps the indexed content alive."""
        files = {(i.file, i.identity) for i in map(self.items.get, fqns)
                 if i is not None and i.mm is not None and i.identity is not None}
        for file, identity in files:
            differences = rewritten_in_place(file, identity)
            if differences:
                raise CheckpointChangedError(
                    f"checkpoint file '{file}' was rewritten in place after the model was "
                    f"loaded ({'; '.join(differences)}): its weights served from disk no "
                    "longer hold what was loaded. Load the model again (and write new "
                    "checkpoints to a new file, or rename over the old one).")

    def release(self, fqns: Iterable[str]) -> None:
        """Drop the pages of disk-tier ``fqns`` from this process's memory."""
        for fqn in fqns:
            item = self.items.get(fqn)
            if item is not None and item.mm is not None:
                advise(item.mm, item.byte_range, mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
