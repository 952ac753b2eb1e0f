"""Tensor bytes of an indexed checkpoint: zero-copy views of private (copy-on-write) mmaps for
safetensors, memory-mapped state dicts for torch pickles. Files open lazily, once each."""

from __future__ import annotations

import logging
import mmap
import os
import threading
from pathlib import Path

import torch

from bigload.errors import CheckpointChangedError, CheckpointError, CorruptCheckpointError

from ._files import changed, check_content, open_regular, open_unchanged, os_error
from ._safetensors import file_content_id
from ._torch_pickle import load_state_dict
from ._types import CheckpointIndex, FileIdentity, TensorEntry

__all__ = ["CheckpointReader", "open_reader"]

logger = logging.getLogger(__name__)


class CheckpointReader:
    """Reads tensors of ``index``; a context manager; ``get`` is thread-safe.

    safetensors tensors are views of one ``mmap.ACCESS_COPY`` (MAP_PRIVATE) map per file: no
    copy, pages come from the page cache on first touch, and writing to a tensor never changes
    the file. ``mmap_for(file)`` hands out that map so offload code can ``madvise`` it.

    Each file is checked when it is opened: a file whose size, times, inode or header differ
    from what ``read_index`` recorded (``index.identities``) raises
    :class:`~bigload.errors.CheckpointChangedError` before any of its tensors is served.
    """

    def __init__(self, index: CheckpointIndex):
        self.index = index
        self._lock = threading.Lock()
        self._closed = False
        self._mmaps: dict[Path, mmap.mmap] = {}
        self._bytes: dict[Path, memoryview] = {}  # one view of each whole map
        self._state_dicts: dict[Path, dict[str, torch.Tensor]] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get(self, name: str) -> torch.Tensor:
        """The CPU tensor stored as ``name``, with its stored dtype and shape."""
        entry = self.index[name]
        if entry.byte_range is None:
            return self._torch_tensor(entry)
        return self._safetensors_tensor(entry)

    def mmap_for(self, file: str | Path) -> mmap.mmap:
        """The private map of safetensors ``file`` (one of ``index.files``), opened if needed.

        Owned by the reader: do not close it. Tensors from ``get`` view it at their entry's
        ``byte_range``; e.g. ``mm.madvise(mmap.MADV_WILLNEED, start, length)`` to prefetch, or
        ``MADV_DONTNEED`` to drop pages (``start`` a multiple of ``mmap.PAGESIZE``) — unmodified
        pages read back from the file on the next touch.
        """
        path = Path(file)
        if path not in self.index.files or self.index.format != "safetensors":
            raise ValueError(
                f"'{path}' is not a safetensors file of checkpoint '{self.index.root}' "
                f"(format {self.index.format}, files: {[f.name for f in self.index.files]})"
            )
        self._file_bytes(path)
        return self._mmaps[path]

    def close(self) -> None:
        """Drop every map and state dict. Tensors still alive keep their memory valid: their
        map is unmapped when the last of them is freed."""
        with self._lock:
            self._closed = True
            self._bytes.clear()
            self._state_dicts.clear()
            for path, mm in self._mmaps.items():
                _close_quietly(path, mm)
            self._mmaps.clear()

    def _safetensors_tensor(self, entry: TensorEntry) -> torch.Tensor:
        start, end = entry.byte_range
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        data = self._file_bytes(entry.file)
        if end > len(data):
            raise CorruptCheckpointError(
                f"'{entry.name}' ends at byte {end} of '{entry.file}', which now has "
                f"{len(data)} bytes: the file changed since it was indexed. Index it again."
            )
        # a storage of its own over exactly its bytes (still zero-copy): saving a loaded model
        # (torch.save, safetensors) writes each tensor's bytes, not the whole mapped file
        raw = torch.frombuffer(data[start:end], dtype=torch.uint8)
        if start % entry.dtype.itemsize:
            raw = raw.clone()  # a misaligned start cannot be viewed as `dtype`
        return raw.view(entry.dtype).view(entry.shape)

    def _torch_tensor(self, entry: TensorEntry) -> torch.Tensor:
        tensor = self._state_dict(entry.file).get(entry.name)
        if tensor is None or (tensor.dtype, tuple(tensor.shape)) != (entry.dtype, entry.shape):
            raise CheckpointChangedError(
                f"'{entry.name}' of '{entry.file}' is no longer the {entry.dtype} tensor of shape "
                f"{entry.shape} that was indexed: the file changed. Call read_index again."
            )
        return tensor.detach().contiguous()

    def _file_bytes(self, path: Path) -> memoryview:
        data = self._bytes.get(path)
        if data is not None:
            return data
        with self._lock:
            self._check_open()
            if path not in self._bytes:
                self._bytes[path] = self._map(path)
            return self._bytes[path]

    def _map(self, path: Path) -> memoryview:
        fd = _open_checked(path, self.index.identities.get(path))
        try:
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as err:  # emptied since the fstat a moment ago
            raise changed(path, [f"it cannot be mapped ({err})"]) from err
        finally:
            os.close(fd)
        self._mmaps[path] = mm
        # each tensor's torch.frombuffer keeps a slice of this view alive, which holds a buffer
        # export: mm.close() raises BufferError instead of unmapping under a live tensor.
        return memoryview(mm)

    def _state_dict(self, path: Path) -> dict[str, torch.Tensor]:
        state_dict = self._state_dicts.get(path)
        if state_dict is not None:
            return state_dict
        with self._lock:
            self._check_open()
            if path not in self._state_dicts:
                expected = self.index.identities.get(path)
                self._state_dicts[path] = load_state_dict(path, expected)[0]
            return self._state_dicts[path]

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(
                f"the reader of checkpoint '{self.index.root}' is closed; open a new "
                "CheckpointReader."
            )


def _open_checked(path: Path, expected: FileIdentity | None) -> int:
    """A descriptor of safetensors ``path``, refused if the file is no longer ``expected``
    (stat, then header). An index built by hand records no identities (e.g. of offload packs
    bigload wrote a moment ago): its files are opened unchecked."""
    if expected is None:
        logger.debug("'%s': the index records no identity; opened without a check", path)
        return open_regular(path)[0]
    fd, st = open_unchanged(path, expected)
    try:
        check_content(path, expected, file_content_id(fd, st.st_size) or "")
    except OSError as err:  # an I/O error while reading the header
        os.close(fd)
        raise os_error(path, err) from err
    except CheckpointChangedError:
        os.close(fd)
        raise
    return fd


def _close_quietly(path: Path, mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        logger.debug("'%s' is still viewed by live tensors; unmapped when they are freed", path)


def open_reader(index: CheckpointIndex) -> CheckpointReader:
    """The reader of ``index``: the index's own when it has one (``index.open_reader()``, e.g.
    an index with derived tensors), else a :class:`CheckpointReader`."""
    opener = getattr(index, "open_reader", None)
    return opener() if callable(opener) else CheckpointReader(index)
