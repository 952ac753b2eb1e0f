"""Access to an offload folder: the checks it passes before any tensor moves, the lock that
serialises lookups and writes between processes, and the removal of what a killed write left."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OffloadError

logger = logging.getLogger(__name__)

LOCK_FILE = "bigload-offload.lock"
# what bigload names its temporary files in a folder: .bigload-pack-<16 hex>.tmp and the like
TEMP_PATTERN = re.compile(r"^\.bigload-(pack|manifest)-[0-9a-f]{16}\.tmp$")
_FIX = "pass an offload_folder this process can read and write, or fix this folder's permissions"
_WHY = {
    errno.EROFS: ("is on a read-only filesystem",
                  "pass an offload_folder on a writable filesystem"),
    errno.EACCES: ("is not accessible to this process", _FIX),
    errno.EPERM: ("is not accessible to this process", _FIX),
    errno.ENOSPC: ("is on a full filesystem", "free space there or pass another offload_folder"),
    errno.EDQUOT: ("is over its disk quota", "free space there or pass another offload_folder"),
    errno.ENOTDIR: ("is not a folder (a part of its path is a file)",
                    "pass a folder path whose parents are folders"),
}


def folder_error(folder: Path, err: OSError, doing: str) -> OffloadError:
    """An OffloadError naming ``folder``, what failed while ``doing`` and what to do."""
    what, fix = _WHY.get(err.errno or 0, ("cannot be used", _FIX))
    return OffloadError(
        f"offload folder '{folder}' {what} ({doing}: {err.strerror or err}, uid "
        f"{os.getuid()}); nothing was loaded. To fix: {fix}."
    )


def prepare_folder(folder: str | os.PathLike) -> Path:
    """The absolute path of an offload folder that exists and that this process can list,
    read and write, created if needed; an OffloadError naming what is wrong otherwise. Runs
    before any tensor moves."""
    path = Path(folder).expanduser().absolute()
    try:
        path = path.resolve()
        _refuse_files(path)
    except OSError as err:  # e.g. a parent this process may not search
        raise folder_error(path, err, "looking it up") from err
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise folder_error(path, err, "creating it") from err
    _check_access(path)
    return path


def _refuse_files(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise OffloadError(
            f"offload folder '{path}' is a file, not a folder; nothing was loaded. Pass the "
            "path of a folder (a new one is created), not of a file."
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OffloadError(
                    f"offload folder '{path}' cannot be created: '{parent}' is a file; nothing "
                    "was loaded. Pass a folder path whose parents are folders."
                )
            return


def _check_access(path: Path) -> None:
    if not os.access(path, os.R_OK | os.X_OK):
        raise OffloadError(
            f"offload folder '{path}' cannot be listed or read by this process (uid "
            f"{os.getuid()}); nothing was loaded. To fix: {_FIX}."
        )
    if os.access(path, os.W_OK | os.X_OK):
        return
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        raise folder_error(path, OSError(errno.EROFS, os.strerror(errno.EROFS)), "checking it")
    raise OffloadError(
        f"offload folder '{path}' is not writable by this process (uid {os.getuid()}); "
        f"nothing was loaded. To fix: {_FIX}."
    )


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the folder's lock file: one process at a time looks up
    and writes packs; the others wait (released by the kernel if the holder dies)."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise folder_error(folder, err, f"opening its lock file {LOCK_FILE}") from err
    try:
        _lock(folder, fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock(folder: Path, fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logger.info("waiting for another process writing into offload folder '%s'", folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            raise folder_error(folder, err, f"locking {LOCK_FILE}") from err
    except OSError as err:  # e.g. ENOLCK: a filesystem without locks
        raise folder_error(folder, err, f"locking {LOCK_FILE}") from err


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove temporary files of bigload's own naming, which a killed write left behind (call
    it holding the lock: no live write has one then). Other files are never touched."""
    stale = [p for p in folder.iterdir() if TEMP_PATTERN.match(p.name)
             and p.is_file() and not p.is_symlink()]
    for path in stale:
        logger.warning("removing '%s', left by an interrupted offload write", path)
        path.unlink(missing_ok=True)
    return stale


def sync_folder(folder: Path) -> None:
    """fsync ``folder`` itself, so that a rename into it survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
