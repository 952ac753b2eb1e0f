"""Streaming the disk tier where memory is tight: each use of a disk unit reads its bytes into
one of a small, reused pool of buffers, with parallel reads that drop the page cache behind
them, the next unit read ahead while the current one computes. Resident memory stays at the
pool's size, and the page cache does not grow past it. (Where memory is plentiful the runtime
uses no pool: disk units run on views of their files and the page cache keeps them.)

The pool holds ``1 + depth`` buffers of the largest disk unit's size: exactly the room the
planner reserves for streaming. Reads are buffered, in page-aligned chunks spread over a few
threads, without read-ahead past the range, and ``POSIX_FADV_DONTNEED`` drops the pages they
brought in. (On the development VM ``O_DIRECT`` read at half the speed of
buffered reads, 540-590 vs 1,200 MB/s cold: docs/design.md.)"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import FileIdentity, open_unchanged
from ..errors import CheckpointChangedError
from .store import StoredTensor

logger = logging.getLogger(__name__)

ALIGN = 4096  # reads start and end on page boundaries, so whole pages are dropped after
CHUNK = 8 << 20  # bytes per read request: large enough for the disk, small enough to spread
READ_WORKERS = 4


@dataclass(frozen=True)
class _Span:
    """One read: ``length`` bytes of ``file`` at ``offset`` into the buffer at ``at``; the file
    must still be what ``identity`` says."""

    file: Path
    offset: int
    length: int
    at: int
    identity: FileIdentity | None = None


@dataclass(frozen=True)
class _Layout:
    """Where a unit's tensors sit in a buffer: the reads that fill it, and each tensor's byte
    offset in the buffer."""

    spans: tuple[_Span, ...]
    starts: dict[str, int]
    nbytes: int


def layout(items: Sequence[StoredTensor]) -> _Layout:
    """Aligned reads covering every item (adjacent items in a file merged into one read)."""
    ranges = sorted(((i.file, i.byte_range[0], i.byte_range[1], i.fqn) for i in items
                     if i.file is not None and i.byte_range is not None), key=lambda r: r[:2])
    identity = {i.file: i.identity for i in items}
    spans: list[_Span] = []
    starts: dict[str, int] = {}
    at = 0
    for file, start, end, fqn in ranges:
        first, last = (start // ALIGN) * ALIGN, -(-end // ALIGN) * ALIGN
        current = spans[-1] if spans else None
        if current and current.file == file and first <= current.offset + current.length:
            grown = max(current.offset + current.length, last) - current.offset
            spans[-1] = _Span(file, current.offset, grown, current.at, identity[file])
            at = current.at + grown
            starts[fqn] = current.at + (start - current.offset)
            continue
        spans.append(_Span(file, first, last - first, at, identity[file]))
        starts[fqn] = at + (start - first)
        at += last - first
    return _Layout(tuple(spans), starts, at)


class Streamer:
    """Reads disk units into a pool of ``slots`` buffers of ``buffer_bytes`` each (pinned when
    the units run on an accelerator). ``start(key, items)`` begins reading a unit into a free
    buffer (or does nothing when none is free); ``take(key, items)`` returns its tensors,
    reading now if it was not started; ``release(key)`` returns the buffer to the pool."""

    def __init__(self, buffer_bytes: int, slots: int, *, pin: bool = False,
                 workers: int = READ_WORKERS):
        self.buffer_bytes = buffer_bytes
        self.slots = max(1, slots)
        self.pin = pin
        self._free: list[tuple[torch.Tensor, Any]] = []
        self._allocated = 0
        self._busy: dict[str, tuple[torch.Tensor, Future]] = {}
        self._lock = threading.Lock()
        # a unit's fill waits for its chunk reads: fills and reads run in pools of their own, so
        # that any number of fills in flight can never hold every reader
        self._fills = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bigload-fill")
        self._reads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bigload-read")

    def start(self, key: str, items: Sequence[StoredTensor]) -> None:
        with self._lock:
            if key in self._busy:
                return
            buffer = self._buffer()
            if buffer is None:
                return
            self._busy[key] = (buffer, self._fills.submit(self._fill, buffer, items))

    def take(self, key: str, items: Sequence[StoredTensor]) -> dict[str, torch.Tensor]:
        with self._lock:
            busy = self._busy.get(key)
            if busy is None:
                buffer = self._buffer()
                buffer = self._extra() if buffer is None else buffer
                busy = self._busy[key] = (buffer, self._fills.submit(self._fill, buffer, items))
        return busy[1].result()

    def release(self, key: str, after: Any = None) -> None:
        """Return ``key``'s buffer to the pool; ``after`` (a CUDA event) is waited for before
        the buffer is read into again (copies from it may still be in flight)."""
        with self._lock:
            busy = self._busy.pop(key, None)
            if busy is not None:
                self._free.append((busy[0], after))

    def settle(self) -> None:
        """Wait for the reads in flight (a read-ahead for the next forward may still be
        running when a forward returns)."""
        with self._lock:
            fills = [future for _, future in self._busy.values()]
        for future in fills:
            future.exception()

    def close(self) -> None:
        self._fills.shutdown(wait=True)
        self._reads.shutdown(wait=True)

    def __deepcopy__(self, memo: dict) -> Streamer:
        return self

    def _buffer(self) -> torch.Tensor | None:
        if self._free:
            buffer, after = self._free.pop()
            if after is not None:
                after.synchronize()
            return buffer
        if self._allocated >= self.slots:
            return None
        self._allocated += 1
        return self._allocate()

    def _extra(self) -> torch.Tensor:
        """A buffer beyond the pool, for units that run nested inside another streamed unit
        (a module hooked inside a preloaded parent); released to the pool like the others."""
        logger.debug("streaming pool of %d buffers exhausted: one more of %d bytes",
                     self.slots, self.buffer_bytes)
        self.slots += 1
        self._allocated += 1
        return self._allocate()

    def _allocate(self) -> torch.Tensor:
        raw = torch.empty(self.buffer_bytes + ALIGN, dtype=torch.uint8, pin_memory=self.pin)
        skip = -raw.data_ptr() % ALIGN
        return raw[skip:skip + self.buffer_bytes]

    # --- reading ---------------------------------------------------------------------------
    def _fill(self, buffer: torch.Tensor, items: Sequence[StoredTensor]) -> dict[str, torch.Tensor]:
        plan = layout(items)
        if plan.nbytes > buffer.numel():
            raise RuntimeError(
                f"bigload: a disk unit needs {plan.nbytes} bytes, the streaming buffer holds "
                f"{buffer.numel()}; the plan's streaming reserve is too small")
        chunks = [(span, offset) for span in plan.spans
                  for offset in range(0, span.length, CHUNK)]
        reads = [self._reads.submit(self._read, buffer, span, offset) for span, offset in chunks]
        for read in reads:
            read.result()
        return {i.fqn: _view(buffer, plan.starts[i.fqn], i.tensor) for i in items
                if i.fqn in plan.starts}

    def _read(self, buffer: torch.Tensor, span: _Span, offset: int) -> None:
        length = min(CHUNK, span.length - offset)
        target = memoryview(buffer[span.at + offset:span.at + offset + length].numpy())
        position = span.offset + offset
        done = _read_at(span.file, span.identity, target, position)
        if done < length and position + done < span.file.stat().st_size:
            raise CheckpointChangedError(
                f"'{span.file}' returned {done} of {length} bytes at offset {position}: the "
                "file changed since it was indexed. Load the model again.")


def _read_at(file: Path, identity: FileIdentity | None, target: memoryview, offset: int, *,
             drop: bool = True) -> int:
    """Read into ``target`` from ``offset`` of ``file`` until full or end of file, refusing a file
    that is no longer the one indexed (``identity``); the pages the read brought into the page
    cache are dropped unless ``drop=False``."""
    fd = open_unchanged(file, identity)[0] if identity is not None else os.open(file, os.O_RDONLY)
    try:
        if drop:  # no read-ahead past the range: those pages would stay behind in the cache
            os.posix_fadvise(fd, offset, len(target), os.POSIX_FADV_RANDOM)
        done = _read_fully(fd, target, offset)
        if drop:
            os.posix_fadvise(fd, offset, len(target), os.POSIX_FADV_DONTNEED)
        return done
    finally:
        os.close(fd)


def _read_fully(fd: int, target: memoryview, offset: int) -> int:
    done = 0
    while done < len(target):
        n = os.preadv(fd, [target[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _view(buffer: torch.Tensor, start: int, like: torch.Tensor) -> torch.Tensor:
    raw = buffer[start:start + like.numel() * like.element_size()]
    if start % like.element_size():
        raw = raw.clone()
    return raw.view(like.dtype).view(like.shape)


def read_resident(entry: Any, identity: FileIdentity | None = None, *, pin: bool = False,
                  drop: bool = False) -> torch.Tensor:
    """The tensor of checkpoint ``entry`` (safetensors: ``file``, ``byte_range``, ``dtype``,
    ``shape``) read into memory of its own, in chunks, from the file ``identity`` describes. The
    page cache the read used is dropped with ``drop`` (where memory is tight), else kept: it is
    reclaimable, and warm for the next load."""
    start, end = entry.byte_range
    raw = torch.empty(end - start, dtype=torch.uint8, pin_memory=pin)
    target = memoryview(raw.numpy())
    for offset in range(0, end - start, CHUNK):
        piece = target[offset:offset + CHUNK]
        if _read_at(Path(entry.file), identity, piece, start + offset, drop=drop) < len(piece):
            raise CheckpointChangedError(
                f"'{entry.file}' ended before byte {end} of {entry.name!r}: the file changed "
                "since it was indexed. Load the model again.")
    if raw.data_ptr() % entry.dtype.itemsize:
        raw = raw.clone()
    return raw.view(entry.dtype).view(entry.shape)
