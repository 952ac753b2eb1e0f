"""Memory this process may use: the host's available RAM, and the memory cgroup limits it runs
under (v2 ``memory.max``/``memory.high``, v1 ``memory.limit_in_bytes``), its own cgroup's and
every ancestor's. Files are read below ``root`` so that tests can fake a machine.

A cgroup's free memory is its limit less its *working set*: what it is charged
(``memory.current`` / ``memory.usage_in_bytes``) less its inactive page cache (``inactive_file``
in ``memory.stat``), as ``docker stats`` and the kubelet count it. Inactive file pages are the
first the kernel reclaims when the cgroup reaches its limit, without an OOM kill, so counting
them as used would make a container that once read a large file look full. Active file pages
are counted as used: they may be reclaimable, but they may also be what keeps this process fast.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

log = logging.getLogger(__name__)

SYSTEM_ROOT = Path("/")  # tests point this at a fake tree
_V1_UNLIMITED = 1 << 62  # v1 writes "no limit" as the largest page count (9223372036854771712)
_DEFAULT_MOUNTS = {"v2": "/sys/fs/cgroup", "v1": "/sys/fs/cgroup/memory"}
Version = Literal["v1", "v2"]


@dataclass(frozen=True)
class CgroupLimit:
    """One cgroup's memory limit and the working set charged against it."""

    limit_bytes: int
    used_bytes: int  # charged, less inactive page cache
    limit_file: str  # the file that set the limit, as the machine names it

    @property
    def free_bytes(self) -> int:
        return max(0, self.limit_bytes - self.used_bytes)


@dataclass(frozen=True)
class AvailableMemory:
    """Bytes this process may still take: the host's available RAM, or less under ``limit``
    (the cgroup limit that binds, None when the host's RAM is the smaller)."""

    size_bytes: int
    host_bytes: int
    limit: CgroupLimit | None


def available_memory(*, root: Path | None = None) -> AvailableMemory:
    """The smaller of the host's available RAM and the free memory under the tightest cgroup
    limit of this process."""
    root = SYSTEM_ROOT if root is None else Path(root)
    host = host_available_bytes(root=root)
    limit = memory_limit(root=root)
    if limit is not None and limit.free_bytes < host:
        return AvailableMemory(limit.free_bytes, host, limit)
    return AvailableMemory(host, host, None)


def host_available_bytes(*, root: Path | None = None) -> int:
    """``MemAvailable`` of ``/proc/meminfo``; psutil's figure where there is none (not Linux)."""
    root = SYSTEM_ROOT if root is None else Path(root)
    meminfo = _read_text(root / "proc/meminfo")
    match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", meminfo or "", re.MULTILINE)
    if match:
        return int(match.group(1)) * 1024
    import psutil

    return int(psutil.virtual_memory().available)


def memory_limit(*, root: Path | None = None) -> CgroupLimit | None:
    """The limit with the least free memory among this process's memory cgroup and its
    ancestors (a parent's limit also binds its children), or None when nothing limits it."""
    root = SYSTEM_ROOT if root is None else Path(root)
    found = [limit for version, folder, mount in cgroup_folders(root)
             for level in _up_to(folder, mount)
             if (limit := _read_limit(level, root, version)) is not None]
    return min(found, key=lambda limit: limit.free_bytes, default=None)


def cgroup_folders(root: Path) -> list[tuple[Version, Path, Path]]:
    """(version, folder, the hierarchy's mount point) of this process's memory cgroups: v2's,
    and v1's memory hierarchy, as paths below ``root``."""
    mounts = _cgroup_mounts(root)
    folders: list[tuple[Version, Path, Path]] = []
    for line in (_read_text(root / "proc/self/cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        version: Version | None = (
            "v2" if hierarchy == "0" and controllers == ""
            else "v1" if "memory" in controllers.split(",") else None
        )
        if version is None or not path.startswith("/"):
            continue
        mount_root, mount_point = mounts.get(version, ("/", _DEFAULT_MOUNTS[version]))
        mount = _under(root, mount_point)
        # with a cgroup namespace or a container's own mount, the mount shows the path's tail
        inside = PurePosixPath(path)
        relative = inside.relative_to(mount_root) if inside.is_relative_to(mount_root) else None
        folder = mount / str(relative) if relative is not None else mount
        folders.append((version, folder if folder.is_dir() else mount, mount))
    return folders


def _cgroup_mounts(root: Path) -> dict[Version, tuple[str, str]]:
    """version → (cgroup path mounted, mount point) from ``/proc/self/mountinfo``."""
    mounts: dict[Version, tuple[str, str]] = {}
    for line in (_read_text(root / "proc/self/mountinfo") or "").splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        version: Version | None = (
            "v2" if fstype == "cgroup2" else "v1" if fstype == "cgroup" and "memory" in options
            else None
        )
        if version is not None and version not in mounts:
            mounts[version] = (_unescape(fields[3]), _unescape(fields[4]))
    return mounts


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040, ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _under(root: Path, machine_path: str) -> Path:
    return root / machine_path.lstrip("/")


def _up_to(folder: Path, mount: Path) -> list[Path]:
    """``folder`` and its parents up to the hierarchy's mount point."""
    levels = [folder]
    while levels[-1] != mount and mount in levels[-1].parents:
        levels.append(levels[-1].parent)
    return levels


def _read_limit(folder: Path, root: Path, version: Version) -> CgroupLimit | None:
    if version == "v2":
        limits = [(value, name) for name in ("memory.max", "memory.high")
                  if (value := _read_bytes(folder / name)) is not None]
        usage_file, inactive_key = "memory.current", "inactive_file"
    else:
        value = _read_bytes(folder / "memory.limit_in_bytes")
        limits = [(value, "memory.limit_in_bytes")] if value is not None else []
        usage_file, inactive_key = "memory.usage_in_bytes", "total_inactive_file"
    if not limits:
        return None
    limit_bytes, name = min(limits)
    usage = _read_bytes(folder / usage_file) or 0
    inactive = _stat_value(folder / "memory.stat", inactive_key) or 0
    machine = PurePosixPath("/") / (folder / name).relative_to(root)
    return CgroupLimit(limit_bytes, max(0, usage - inactive), str(machine))


def _read_bytes(path: Path) -> int | None:
    """A cgroup file holding one number of bytes; None when absent, unlimited or unreadable."""
    text = _read_text(path)
    if text is None or text.strip() == "max":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        log.debug("ignoring %s: %r is not a number of bytes", path, text[:80])
        return None
    if value < 0 or value >= _V1_UNLIMITED:
        return None
    return value


def _stat_value(path: Path, key: str) -> int | None:
    for line in (_read_text(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                log.debug("ignoring %s: %r is not a number", path, line[:80])
                return None
    return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        log.debug("cannot read %s: %s", path, err)
        return None
