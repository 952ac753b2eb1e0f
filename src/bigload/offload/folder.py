"""Offload folders: tensors that must be converted before they can be served from disk (another
dtype, a torch pickle, a tensor built from several, a tensor held in memory) are written once
into the folder and served from it by mmap. One scheme for every writer.

A folder holds packs (``packs``: safetensors files, each tensor named by its content key, see
``sources``), a manifest caching digests of checkpoint tensors, and a lock file. A load serves
every tensor some pack already holds and writes the missing ones into one new pack. Files of
other names are never read, changed or removed, so a checkpoint's own folder can be its offload
folder. Lookups and writes hold the folder's lock (``access``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import CheckpointReader, TensorEntry
from .access import locked, prepare_folder, remove_stale_temporaries
from .packs import Pack, PackSpec, read_packs, write_pack
from .sources import (
    Identity,
    Manifest,
    content_key,
    file_identity,
    read_manifest,
    settled,
    source_digest,
)
from .store import StoredTensor, Tier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OffloadItem:
    """One tensor to serve from the folder: its ``name`` (the model's fqn), ``dtype`` and
    ``shape`` as served, and ``read`` returning the values it is made from (any dtype). Values
    read from checkpoint ``files`` name the tensor there (``source``), so that the manifest can
    cache their digest; values in memory have no files."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    files: tuple[Path, ...] = ()
    source: str = ""


@dataclass
class Served:
    """What the folder serves: one stored, mapped tensor per item name, the readers that keep
    the maps alive, the bytes written and how many tensors were already there."""

    folder: Path | None = None
    tensors: dict[str, StoredTensor] = field(default_factory=dict)
    readers: list[CheckpointReader] = field(default_factory=list)
    bytes_written: int = 0
    reused: int = 0


def serve_from_folder(folder: str | os.PathLike, items: Sequence[OffloadItem]) -> Served:
    """Serve ``items`` from ``folder``: from the packs that hold them, the missing ones written
    now into one new pack. The folder is checked first (an OffloadError names what is wrong:
    a file, read-only, not writable, a foreign manifest, no room); a failure leaves no partial
    pack behind."""
    if not items:
        return Served()
    path = prepare_folder(folder)
    with locked(path):
        remove_stale_temporaries(path)
        lookup = _Lookup(read_packs(path))
        manifest = read_manifest(path)
        before = {files: file_identity(files) for files in {i.files for i in items if i.files}}
        digests: dict[str, str] = {}
        found, missing = _find(items, lookup, manifest, before, digests)
        written = _write_missing(path, missing, digests, found)
        if _record(items, manifest, before, digests):
            manifest.save(path)
        served = _serve(path, items, found)
    served.bytes_written, served.reused = written, len(items) - len(missing)
    logger.info("offload folder %s: %d tensor(s) reused, %d converted (%d bytes written)",
                path, served.reused, len(missing), written)
    return served


class _Lookup:
    """Where each content key is held (the first valid pack that has it), and which dtypes and
    shapes the packs hold at all."""

    def __init__(self, packs: Sequence[Pack]):
        self.held: dict[str, tuple[Pack, TensorEntry]] = {}
        for pack in packs:
            for key, name in pack.names.items():
                self.held.setdefault(key, (pack, pack.index.entries[name]))
        self.specs = {(entry.dtype, entry.shape) for _, entry in self.held.values()}

    def get(self, item: OffloadItem, digest: str) -> tuple[Pack, TensorEntry] | None:
        hit = self.held.get(content_key(item.dtype, item.shape, digest))
        if hit is None or (hit[1].dtype, hit[1].shape) != (item.dtype, item.shape):
            return None
        return hit


def _find(
    items: Sequence[OffloadItem], lookup: _Lookup, manifest: Manifest,
    before: Mapping[tuple[Path, ...], Identity], digests: dict[str, str],
) -> tuple[dict[str, tuple[Pack, TensorEntry]], list[OffloadItem]]:
    found, missing = {}, []
    for item in items:
        digest = _known_digest(item, lookup, manifest, before)
        hit = lookup.get(item, digest) if digest is not None else None
        if digest is not None:
            digests[item.name] = digest
        if hit is None:
            missing.append(item)
        else:
            found[item.name] = hit
    return found, missing


def _known_digest(item: OffloadItem, lookup: _Lookup, manifest: Manifest,
                  before: Mapping[tuple[Path, ...], Identity]) -> str | None:
    """The digest of ``item``'s values when it is cached, or worth reading now: a pack holds a
    tensor of its dtype and shape and its files are not on record. (Files on record were read
    before: a tensor of theirs the record lacks was never converted from them, it is new.)"""
    if item.files:
        identity = before[item.files]
        cached = manifest.digest(identity, item.source)
        if cached is not None or manifest.knows(identity):
            return cached
    if (item.dtype, item.shape) in lookup.specs:
        return source_digest(item.read())
    return None


def _write_missing(folder: Path, missing: Sequence[OffloadItem], digests: dict[str, str],
                   found: dict[str, tuple[Pack, TensorEntry]]) -> int:
    """One new pack with ``missing``; their digests are computed while their values are read."""
    if not missing:
        return 0
    specs = [PackSpec(item.name, item.dtype, item.shape,
                      functools.partial(_produce, item, digests)) for item in missing]
    pack, keys = write_pack(folder, specs)
    for item, key in zip(missing, keys):
        found[item.name] = (pack, pack.index.entries[pack.names[key]])
    return pack.path.stat().st_size


def _produce(item: OffloadItem, digests: dict[str, str]) -> tuple[torch.Tensor, str]:
    values = item.read()
    digest = digests.get(item.name) or source_digest(values)
    digests[item.name] = digest
    return values.to(item.dtype), content_key(item.dtype, item.shape, digest)


def _record(items: Sequence[OffloadItem], manifest: Manifest,
            before: Mapping[tuple[Path, ...], Identity], digests: Mapping[str, str]) -> bool:
    """Cache the digests of checkpoint tensors whose files did not change while they were read
    and are settled. Returns whether anything new was recorded."""
    after = {files: file_identity(files) for files in before}
    changed = False
    for item in items:
        identity, digest = before.get(item.files), digests.get(item.name)
        if identity is None or digest is None or after[item.files] != identity:
            continue
        if settled(identity) and manifest.digest(identity, item.source) != digest:
            manifest.record(identity, item.source, digest)
            changed = True
    return changed


def _serve(folder: Path, items: Sequence[OffloadItem],
           found: Mapping[str, tuple[Pack, TensorEntry]]) -> Served:
    served, readers = Served(folder), {}
    for item in items:
        pack, entry = found[item.name]
        reader = readers.get(pack.path)
        if reader is None:
            reader = readers[pack.path] = CheckpointReader(pack.index)
            served.readers.append(reader)
        served.tensors[item.name] = StoredTensor(
            item.name, reader.get(entry.name).data, "disk", reader.mmap_for(pack.path),
            entry.byte_range, file=pack.path)
    return served


def stored_views(reader: CheckpointReader, tier: Tier = "disk") -> Iterator[StoredTensor]:
    """Every tensor of ``reader`` as a stored, mapped tensor of its own (own version counter)."""
    for name, entry in reader.index.entries.items():
        tensor = reader.get(name).data
        mm = reader.mmap_for(entry.file) if entry.byte_range else None
        yield StoredTensor(name, tensor, tier, mm, entry.byte_range, file=entry.file)
