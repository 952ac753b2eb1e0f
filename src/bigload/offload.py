"""Where offloaded weights live: CPU memory, or mmap views of safetensors files (the checkpoint's
own, or an offload folder written once, fingerprinted). Pages of disk-tier weights are fetched
ahead of use by a background thread and released after use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .checkpoint import CheckpointReader, read_index
from .checkpoint._safetensors import DTYPES
from .errors import OffloadError

logger = logging.getLogger(__name__)

Tier = Literal["cpu", "disk"]
FINGERPRINT_FILE = "bigload-offload.json"
STORE_ATTR = "_bigload_store"  # where a model keeps its OffloadStore
_SAFETENSORS_NAME = {dtype: code for code, dtype in DTYPES.items()}
_PAGE = mmap.PAGESIZE
_MADV_POPULATE_READ = 22  # Linux >= 5.14; falls back to MADV_WILLNEED where refused


@dataclass
class StoredTensor:
    """One offloaded tensor: the real CPU tensor, and where its bytes are mapped from."""

    fqn: str
    tensor: torch.Tensor
    tier: Tier
    mm: mmap.mmap | None = None
    byte_range: tuple[int, int] | None = None
    version: int = 0

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class OffloadStore:
    """Offloaded tensors by fqn, plus the readers that keep their maps alive.

    Shared, not copied, by ``copy.deepcopy`` (it holds maps of read-only files).
    """

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

    def disk_bytes(self) -> int:
        return sum(i.nbytes for i in self.items.values() if i.tier == "disk")

    def prefetch(self, fqns: Iterable[str], *, map_pages: bool = True) -> None:
        """Start reading the pages of ``fqns`` (disk tier) in the background and map them
        (``MADV_POPULATE_READ``), so that the unit runs without page faults; with
        ``map_pages=False`` (or on kernels before 5.14) only into the page cache
        (``MADV_WILLNEED``)."""
        for fqn in fqns:
            item = self.items.get(fqn)
            if item is None or item.mm is None or fqn in self._pending:
                continue
            with self._lock:
                self._pending[fqn] = self._pool.submit(_fetch, item, map_pages)

    def wait(self, fqns: Iterable[str]) -> None:
        """Wait for prefetches of ``fqns`` still running (so a unit never races its reader)."""
        for fqn in fqns:
            with self._lock:
                future = self._pending.pop(fqn, None)
            if future is not None:
                future.result()

    def release(self, fqns: Iterable[str]) -> None:
        """Drop the pages of disk-tier ``fqns`` from this process's memory."""
        for fqn in fqns:
            item = self.items.get(fqn)
            if item is not None and item.mm is not None:
                _advise(item, mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _page_span(item: StoredTensor) -> tuple[int, int] | None:
    start, end = item.byte_range or (0, 0)
    first = (start // _PAGE) * _PAGE
    return (first, end - first) if end > start else None


def _advise(item: StoredTensor, advice: int) -> None:
    span = _page_span(item)
    if span is not None and item.mm is not None:
        item.mm.madvise(advice, *span)


def _fetch(item: StoredTensor, map_pages: bool) -> None:
    if map_pages:
        try:
            _advise(item, _MADV_POPULATE_READ)
            return
        except OSError:
            pass  # kernel < 5.14
    _advise(item, mmap.MADV_WILLNEED)


# --- offload folders ---------------------------------------------------------------------------

def fingerprint(model_class: str, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                source: str) -> str:
    """A hash of what a folder must hold: model class, tensors (name, dtype, shape), source."""
    digest = hashlib.sha256(f"{model_class}\n{source}\n".encode())
    for name, dtype, shape in sorted(specs, key=lambda s: s[0]):
        digest.update(f"{name}:{dtype}:{list(shape)}\n".encode())
    return digest.hexdigest()


def content_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of tensor values, for folders written from tensors in memory: a model of the same
    architecture with other weights must not reuse the folder."""
    digest = hashlib.blake2b(digest_size=32)
    for name, tensor in tensors:
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.hexdigest()


def source_identity(files: Iterable[Path]) -> str:
    """Which checkpoint a folder was converted from: paths, sizes and modification times."""
    parts = []
    for f in files:
        st = Path(f).stat()
        parts.append(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def open_offload_folder(folder: Path, expected: str) -> CheckpointReader | None:
    """The reader of a complete folder holding exactly ``expected``; None if there is no folder
    (or an empty one). A folder holding anything else is refused, never reused or overwritten."""
    if not folder.exists() or not any(folder.iterdir()):
        return None
    marker = folder / FINGERPRINT_FILE
    found = None
    if marker.is_file():
        try:
            found = json.loads(marker.read_text()).get("fingerprint")
        except (OSError, ValueError):
            found = None
    if found != expected:
        what = "other weights (a different model, checkpoint or dtype)" if found else (
            "files that bigload did not write completely")
        raise OffloadError(
            f"offload folder '{folder}' holds {what}; bigload will not reuse or overwrite it. "
            "Pass an empty or new offload_dir, or delete that folder if it is yours."
        )
    return CheckpointReader(read_index(folder / "offload.safetensors"))


def write_offload_folder(
    folder: Path,
    tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    fingerprint_value: str,
) -> tuple[CheckpointReader, int]:
    """Write ``tensors`` (name, dtype, shape; bytes from ``produce(name)``) as one safetensors
    file, streaming one tensor at a time. Written into a temporary sibling and renamed: an
    interrupted write leaves nothing that looks complete."""
    specs = list(tensors)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        written = _write_safetensors(tmp / "offload.safetensors", specs, produce)
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(
            {"fingerprint": fingerprint_value, "tensors": len(specs), "bytes": written}))
        if folder.exists():
            folder.rmdir()  # empty (checked by open_offload_folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d offloaded tensors (%d bytes) to %s", len(specs), written, folder)
    return CheckpointReader(read_index(folder / "offload.safetensors")), written


def _write_safetensors(
    path: Path, specs: list, produce: Callable[[str], torch.Tensor]
) -> int:
    header, offset = {}, 0
    for name, dtype, shape in specs:
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_NAME[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "writer": "bigload offload"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dtype, shape in specs:
            tensor = produce(name).detach().to("cpu", dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise OffloadError(f"offload of {name!r}: shape {tuple(tensor.shape)} != {shape}")
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def stored_views(reader: CheckpointReader, tier: Tier = "disk") -> Iterator[StoredTensor]:
    """Every tensor of ``reader`` as a stored, mapped tensor of its own (own version counter)."""
    for name, entry in reader.index.entries.items():
        tensor = reader.get(name).data
        mm = reader.mmap_for(entry.file) if entry.byte_range else None
        yield StoredTensor(name, tensor, tier, mm, entry.byte_range)
