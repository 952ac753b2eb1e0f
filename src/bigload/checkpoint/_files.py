"""Opening checkpoint files: regular files only (a FIFO named like a checkpoint would block
``open`` forever), OS errors as typed errors naming the path, and the identity that ties an index
to the files it read."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
from pathlib import Path

from bigload.errors import (
    CheckpointChangedError,
    CheckpointNotFoundError,
    UnreadableCheckpointError,
)

from ._types import FileIdentity

_AGAIN = "Call read_index again (and do not rewrite checkpoint files while a model loads them)."
_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder",
}  # fmt: skip


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file ``path`` and its ``fstat``; the caller closes
    it. Opened non-blocking, so that a FIFO is refused at once instead of waiting for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as err:
        mode = _mode(path)  # a socket cannot be opened at all (ENXIO): say what it is
        raise (_not_regular(path, mode) if mode else os_error(path, err)) from err
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _not_regular(path, st.st_mode)
    os.set_blocking(fd, True)
    return fd, st


def _mode(path: Path) -> int | None:
    """The file type bits of ``path`` when it exists and is not a regular file."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) else mode


def _not_regular(path: Path, mode: int) -> UnreadableCheckpointError:
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return UnreadableCheckpointError(
        f"'{path}' is {kind}, not a regular file: bigload reads checkpoints from regular files "
        "only. Put the weight file itself at this path."
    )


def os_error(path: Path, err: BaseException) -> Exception:
    """The typed error for an ``OSError`` (or a ``ValueError`` for a NUL byte) met on ``path``."""
    if isinstance(err, ValueError):
        return UnreadableCheckpointError(
            f"'{path!s:.300}' is not a usable file name ({err}). Fix the name or the index that "
            "names it."
        )
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return CheckpointNotFoundError(f"'{path}' does not exist. Pass an existing checkpoint.")
    return UnreadableCheckpointError(f"cannot read '{path!s:.300}': {_reason(err)}")


def _reason(err: BaseException) -> str:
    code = getattr(err, "errno", None)
    if code in (errno.EACCES, errno.EPERM):
        return (f"permission denied (user id {os.geteuid()}). Give that user read access, e.g. "
                "`chmod a+r FILE` (and `chmod a+rx` on its folders).")  # fmt: skip
    if code == errno.ENAMETOOLONG:
        return ("the name is longer than the file system allows. Rename the file (and fix the "
                "index that names it).")  # fmt: skip
    if code == errno.ELOOP:
        return "its symbolic links loop. Point the link at the weight file."
    strerror = getattr(err, "strerror", None) or type(err).__name__
    return f"{strerror} (errno {code}). Check the disk or mount, then retry."


def file_identity(st: os.stat_result, *header_parts: bytes) -> FileIdentity:
    """The identity of a file from its ``fstat`` and the header bytes that were read."""
    return FileIdentity(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev,
                        content_id(st.st_size, *header_parts))  # fmt: skip


def content_id(size: int, *header_parts: bytes) -> str:
    digest = hashlib.sha256(f"{size}\n".encode())
    for part in header_parts:
        digest.update(part)
    return digest.hexdigest()


def open_unchanged(path: Path, expected: FileIdentity) -> tuple[int, os.stat_result]:
    """:func:`open_regular`, refusing a file whose size, times, inode or device differ from
    ``expected`` (the header is compared by the caller, who reads it)."""
    try:
        fd, st = open_regular(path)
    except CheckpointNotFoundError as err:
        raise CheckpointChangedError(
            f"checkpoint file '{path}' was removed after it was indexed. {_AGAIN}"
        ) from err
    found = file_identity(st)
    found = dataclasses.replace(found, content_id=expected.content_id)  # compared by the caller
    if found != expected:
        os.close(fd)
        raise changed(path, _differences(expected, found))
    return fd, st


def rewritten_in_place(path: Path, expected: FileIdentity) -> list[str]:
    """How ``path``, still the file ``expected`` describes (same inode and device), differs
    from it: written since it was indexed. Empty when unchanged, removed, or replaced by
    another file (a mapping of the indexed file still holds its content then)."""
    try:
        found = file_identity(os.stat(path))
    except OSError:
        return []
    if (found.inode, found.device) != (expected.inode, expected.device):
        return []
    return _differences(expected, found)


def check_content(path: Path, expected: FileIdentity, found_content_id: str) -> None:
    if found_content_id != expected.content_id:
        raise changed(path, ["its header bytes differ"])


def changed(path: Path, differences: list[str]) -> CheckpointChangedError:
    return CheckpointChangedError(
        f"checkpoint file '{path}' changed after it was indexed ({'; '.join(differences)}): "
        f"its tensors are not served from the new content. {_AGAIN}"
    )


def _differences(expected: FileIdentity, found: FileIdentity) -> list[str]:
    names = {"size": "size", "mtime_ns": "modification time (ns)",
             "ctime_ns": "change time (ns)", "inode": "inode", "device": "device"}  # fmt: skip
    return [f"{label} {getattr(expected, field)} -> {getattr(found, field)}"
            for field, label in names.items()
            if getattr(expected, field) != getattr(found, field)]  # fmt: skip
