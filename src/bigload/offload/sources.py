"""What a converted tensor is: its content key, a hash of its dtype, shape and a digest of the
values it is made from. The folder's manifest caches the digests of checkpoint tensors by the
identity of their files, so that an unchanged checkpoint is not read again to find them.

A file's identity is its path, device, inode, size, mtime and ctime. ctime changes on every
write and every ``utime`` (``cp -p``, ``rsync -t`` and ``touch -r`` restore mtime, not ctime) and
cannot be set by users; a file changed within ``RACY_NS`` of being recorded is not cached, since
timestamps come from a coarse clock and a second write in the same tick would keep its ctime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import OffloadError
from .access import folder_error, sync_folder

logger = logging.getLogger(__name__)

MANIFEST_FILE = "bigload-manifest.json"
RACY_NS = 2_000_000_000
_FORMAT = "bigload offload manifest"
_VERSION = 1

FileIdentity = tuple[str, int, int, int, int, int]  # path, dev, inode, size, mtime_ns, ctime_ns
Identity = tuple[FileIdentity, ...]


def source_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: what a converted tensor is made from."""
    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{data.dtype}|{list(data.shape)}|".encode())
    digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def content_key(dtype: torch.dtype, shape: tuple[int, ...], digest: str) -> str:
    """The key of a tensor served as ``dtype``/``shape`` from values of ``digest``."""
    return hashlib.sha256(f"bigload offload/1|{dtype}|{list(shape)}|{digest}".encode()).hexdigest()


def file_identity(files: Iterable[Path]) -> Identity:
    """The identity of ``files`` (changes whenever their contents may have changed)."""
    found = []
    for file in files:
        st = os.stat(file)
        found.append((str(Path(file).resolve()), st.st_dev, st.st_ino, st.st_size,
                      st.st_mtime_ns, st.st_ctime_ns))
    return tuple(found)


def settled(identity: Identity) -> bool:
    """Whether every file of ``identity`` last changed more than ``RACY_NS`` ago."""
    now = time.time_ns()
    return all(now - file[5] >= RACY_NS for file in identity)


class Manifest:
    """Digests of checkpoint tensors (by name) for each file identity they were read under."""

    def __init__(self, records: dict[Identity, dict[str, str]] | None = None):
        self.records = records if records is not None else {}

    def knows(self, identity: Identity) -> bool:
        return identity in self.records

    def digest(self, identity: Identity, name: str) -> str | None:
        return self.records.get(identity, {}).get(name)

    def record(self, identity: Identity, name: str, digest: str) -> None:
        self.records.setdefault(identity, {})[name] = digest

    def save(self, folder: Path) -> None:
        """Write the records whose files are unchanged (temporary file, fsync, rename). A
        failure is a warning: the manifest is a cache, the packs are already complete."""
        records = [{"files": [list(f) for f in identity], "digests": digests}
                   for identity, digests in self.records.items() if _current(identity)]
        raw = json.dumps({"format": _FORMAT, "version": _VERSION, "sources": records})
        tmp = folder / f".bigload-manifest-{os.urandom(8).hex()}.tmp"
        try:
            with open(tmp, "x") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / MANIFEST_FILE)
            sync_folder(folder)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            logger.warning("could not write '%s' (%s): the next load computes the digests it "
                           "caches again", folder / MANIFEST_FILE, err)


def _current(identity: Identity) -> bool:
    try:
        return file_identity(Path(f[0]) for f in identity) == identity
    except OSError:
        return False


def read_manifest(folder: Path) -> Manifest:
    """The manifest of ``folder`` (empty if there is none); an OffloadError if the file is
    not one bigload wrote."""
    path = folder / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Manifest()
    except OSError as err:
        raise folder_error(folder, err, f"reading {MANIFEST_FILE}") from err
    try:
        return Manifest(_parse(raw))
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise OffloadError(
            f"'{path}' is not a manifest bigload wrote ({err}); nothing was loaded. It only "
            "caches digests of checkpoint files: delete it and load again (bigload rebuilds it)."
        ) from err


def _parse(raw: bytes) -> dict[Identity, dict[str, str]]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
    if data.get("format") != _FORMAT or data.get("version") != _VERSION:
        raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}, "
                         f"expected {_FORMAT!r} version {_VERSION}")
    records = {}
    for record in data["sources"]:
        identity = tuple(_file(f) for f in record["files"])
        digests = record["digests"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
            raise ValueError("a digest is not a string")
        records[identity] = dict(digests)
    return records


def _file(raw: list) -> FileIdentity:
    path, *numbers = raw
    if not isinstance(path, str) or len(numbers) != 5 or not all(
            isinstance(n, int) for n in numbers):
        raise ValueError(f"file identity {raw!r} is not [path, dev, inode, size, mtime, ctime]")
    return (path, *numbers)  # type: ignore[return-value]
