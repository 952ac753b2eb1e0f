"""Helpers for tests of hostile input: a deadline that turns a hang into a failure, a run as an
unprivileged user, and torch zip files rebuilt with chosen records."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

NOBODY = 65534


class Hang(AssertionError):
    """The code under test ran past its deadline (it would have hung)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail with :class:`Hang` if the block runs longer than ``seconds`` (SIGALRM interrupts
    blocking system calls such as opening a FIFO). Main thread only."""

    def _expire(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def as_unprivileged(fn: Callable[[], str]) -> str:
    """``fn()``'s result, run without root's powers: as ``nobody`` in a forked child when this is
    root (file permissions mean nothing to root), directly otherwise. An exception in ``fn``
    comes back as ``"TypeName: message"``."""
    if os.geteuid() != 0:
        return _outcome(fn)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_end, _outcome(fn).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    return result


def _outcome(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except BaseException as err:  # reported to the parent, which asserts on it
        return f"{type(err).__name__}: {err}"


@contextlib.contextmanager
def public_dir() -> Iterator[Path]:
    """A fresh folder that ``nobody`` can enter (pytest's tmp_path lives under a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="bigload-perm-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in sorted(folder.rglob("*"), reverse=True):
            path.chmod(0o700)
        for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        folder.rmdir()


def rezip(
    data: bytes,
    replace: Mapping[str, bytes] | None = None,
    *,
    method: int = zipfile.ZIP_STORED,
) -> bytes:
    """The torch zip ``data`` written again record by record (same names, same order), with
    the records whose name ends with a key of ``replace`` replaced, all stored with ``method``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            for suffix, new in (replace or {}).items():
                if info.filename.endswith(suffix):
                    body = new
            dst.writestr(zipfile.ZipInfo(info.filename), body, compress_type=method)
    return out.getvalue()


def record(data: bytes, suffix: str) -> bytes:
    """The bytes of the record of torch zip ``data`` whose name ends with ``suffix``."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(suffix)]
        return zf.read(name)
