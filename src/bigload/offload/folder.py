"""Offload folders: tensors that must be converted before they can be served from disk (another
dtype, a torch pickle, a tensor held in memory) are written once into one safetensors file with a
fingerprint of what it holds, then served by mmap. One scheme for every writer.

A folder is reused only when its fingerprint matches exactly; a folder holding anything else is
refused, never overwritten. Writes go to a temporary sibling that is renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointReader, read_index
from ..checkpoint._safetensors import DTYPES
from ..errors import OffloadError
from ..sizes import tensor_nbytes
from .store import StoredTensor, Tier

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "bigload-offload.json"
DATA_FILE = "offload.safetensors"
_SAFETENSORS_NAME = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class OffloadItem:
    """One tensor to serve from the folder: what it is, where its values come from (``source``
    identifies them: a checkpoint file and key, or a digest of values in memory) and how to
    produce them."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: str
    produce: Callable[[], torch.Tensor]


def fingerprint(model_class: str, items: Iterable[OffloadItem]) -> str:
    """A hash of what a folder must hold: model class, and each tensor's name, dtype, shape and
    source."""
    digest = hashlib.sha256(f"{model_class}\n".encode())
    for item in sorted(items, key=lambda i: i.name):
        digest.update(f"{item.name}:{item.dtype}:{list(item.shape)}:{item.source}\n".encode())
    return digest.hexdigest()


def value_digest(tensor: torch.Tensor) -> str:
    """A hash of a tensor's values, the source of a tensor written from memory: a model of the
    same architecture with other weights must not reuse the folder."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.blake2b(memoryview(data.view(torch.uint8).numpy()), digest_size=16).hexdigest()


def file_identity(files: Iterable[Path]) -> str:
    """Which checkpoint files values are read from: paths, sizes and modification times."""
    parts = []
    for f in files:
        st = Path(f).stat()
        parts.append(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def open_folder(folder: Path, expected: str) -> CheckpointReader | None:
    """The reader of a complete folder holding exactly ``expected``; None if there is no folder
    (or an empty one). A folder holding anything else is refused, never reused or overwritten.
    Runs before any tensor moves."""
    if not folder.exists() or not any(folder.iterdir()):
        return None
    found = _recorded(folder / FINGERPRINT_FILE)
    if found != expected:
        what = "other weights (a different model, checkpoint or dtype)" if found else (
            "files that bigload did not write completely")
        raise OffloadError(
            f"offload folder '{folder}' holds {what}; bigload will not reuse or overwrite it. "
            "Pass an empty or new offload_dir, or delete that folder if it is yours."
        )
    return CheckpointReader(read_index(folder / DATA_FILE))


def _recorded(marker: Path) -> str | None:
    if not marker.is_file():
        return None
    try:
        value = json.loads(marker.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def serve_from_folder(
    folder: Path, model_class: str, items: Sequence[OffloadItem]
) -> tuple[CheckpointReader, int]:
    """The reader of ``folder`` holding ``items``: reused when its fingerprint matches, else
    written now (bytes from each item's ``produce``). Returns the reader and bytes written."""
    value = fingerprint(model_class, items)
    reader = open_folder(folder, value)
    if reader is not None:
        logger.info("reusing offload folder %s (fingerprint matches)", folder)
        return reader, 0
    written = write_folder(folder, items, value)
    return CheckpointReader(read_index(folder / DATA_FILE)), written


def write_folder(folder: Path, items: Sequence[OffloadItem], fingerprint_value: str) -> int:
    """Write ``items`` as one safetensors file, one tensor at a time, into a temporary sibling
    renamed to ``folder`` when complete: an interrupted write leaves nothing that looks
    complete. Returns the bytes written."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        written = _write_safetensors(tmp / DATA_FILE, items)
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(
            {"fingerprint": fingerprint_value, "tensors": len(items), "bytes": written}))
        if folder.exists():
            folder.rmdir()  # empty (checked by open_folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d offloaded tensors (%d bytes) to %s", len(items), written, folder)
    return written


def _write_safetensors(path: Path, items: Sequence[OffloadItem]) -> int:
    header, offset = {}, 0
    for item in items:
        nbytes = tensor_nbytes(item.shape, item.dtype)
        header[item.name] = {"dtype": _SAFETENSORS_NAME[item.dtype], "shape": list(item.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "writer": "bigload offload"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for item in items:
            tensor = item.produce().detach().to("cpu", item.dtype).contiguous()
            if tuple(tensor.shape) != tuple(item.shape):
                raise OffloadError(
                    f"offload of {item.name!r}: shape {tuple(tensor.shape)} != {item.shape}")
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def stored_views(reader: CheckpointReader, tier: Tier = "disk") -> Iterator[StoredTensor]:
    """Every tensor of ``reader`` as a stored, mapped tensor of its own (own version counter)."""
    for name, entry in reader.index.entries.items():
        tensor = reader.get(name).data
        mm = reader.mmap_for(entry.file) if entry.byte_range else None
        yield StoredTensor(name, tensor, tier, mm, entry.byte_range, file=entry.file)
