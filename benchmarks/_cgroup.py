"""Memory cgroups for benchmark workers: a fresh child cgroup per measurement with a memory limit
(cgroup v2, else v1), the worker moved in before it starts, its peak and OOM kills read after.

Standard library only. Needs root (or a delegated cgroup). A child is made under this process's
own memory cgroup when that is allowed (so whoever accounts for this process also accounts for
the workers), else under the hierarchy's root.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

PREFIX = "bigload-bench-"


@dataclass(frozen=True)
class Hierarchy:
    """Where workers' cgroups are made: a parent folder in a v1 or v2 memory hierarchy."""

    version: str  # "v1" | "v2"
    parent: Path

    def new(self, limit_bytes: int) -> MemoryCgroup:
        path = self.parent / f"{PREFIX}{uuid.uuid4().hex[:8]}"
        path.mkdir()
        group = MemoryCgroup(self.version, path)
        try:
            group.set_limit(limit_bytes)
        except OSError:
            group.remove()
            raise
        return group


@dataclass(frozen=True)
class MemoryCgroup:
    version: str
    path: Path

    def set_limit(self, limit_bytes: int) -> None:
        if self.version == "v2":
            _write(self.path / "memory.max", limit_bytes)
            if (self.path / "memory.swap.max").exists():
                _write(self.path / "memory.swap.max", 0)  # the limit is memory, not swap
        else:
            _write(self.path / "memory.limit_in_bytes", limit_bytes)
            try:  # limit memory + swap to the same figure where swap is accounted
                _write(self.path / "memory.memsw.limit_in_bytes", limit_bytes)
            except OSError:
                pass

    def join(self) -> None:
        """Move the calling process in (a worker calls this between fork and exec)."""
        _write(self.path / "cgroup.procs", os.getpid())

    def peak_bytes(self) -> int | None:
        name = "memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes"
        return _read_int(self.path / name)

    def usage_bytes(self) -> int | None:
        name = "memory.current" if self.version == "v2" else "memory.usage_in_bytes"
        return _read_int(self.path / name)

    def oom_kills(self) -> int | None:
        """Processes the OOM killer killed in this cgroup (kernel >= 4.13 for v1)."""
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        return _keyed(self.path / name, "oom_kill")

    def limit_file(self) -> str:
        return str(self.path / ("memory.max" if self.version == "v2" else "memory.limit_in_bytes"))

    def remove(self) -> None:
        """rmdir once its processes are gone (its page cache moves to the parent)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def find_hierarchy(probe_bytes: int = 1 << 30) -> tuple[Hierarchy | None, str]:
    """A place where this process can make memory-limited cgroups, or None and why not."""
    if os.geteuid() != 0:
        return None, "not root: cannot create memory cgroups"
    reasons = []
    for version in ("v2", "v1"):
        mount = _mount_point(version)
        if mount is None:
            reasons.append(f"no cgroup {version} memory hierarchy mounted")
            continue
        if version == "v2" and "memory" not in _words(mount / "cgroup.controllers"):
            reasons.append(f"cgroup v2 at {mount} has no memory controller")
            continue
        own = _own_path(version, mount)
        for parent in dict.fromkeys(p for p in (own, mount) if p is not None):
            hierarchy = Hierarchy(version, parent)
            if version == "v2" and not _enable_memory(parent):
                reasons.append(f"cannot enable the memory controller below {parent}")
                continue
            try:
                hierarchy.new(probe_bytes).remove()
            except OSError as err:
                reasons.append(f"cannot make a limited cgroup in {parent}: {err}")
                continue
            return hierarchy, f"cgroup {version}, workers' cgroups made in {parent}"
    return None, "; ".join(reasons)


def _mount_point(version: str) -> Path | None:
    """The mount point of the v2 hierarchy or of v1's memory hierarchy (/proc/self/mountinfo)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if (version == "v2" and tail[0] == "cgroup2") or (
            version == "v1" and tail[0] == "cgroup" and "memory" in tail[2].split(",")
        ):
            return Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return None


def _own_path(version: str, mount: Path) -> Path | None:
    """This process's cgroup folder in that hierarchy (assumes the mount shows the full tree;
    otherwise the mount root is used)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        ours = (version == "v2" and hierarchy == "0" and controllers == "") or (
            version == "v1" and "memory" in controllers.split(",")
        )
        if ours:
            folder = mount / path.lstrip("/")
            return folder if folder.is_dir() else None
    return None


def _enable_memory(parent: Path) -> bool:
    """v2: children of ``parent`` get the memory controller (refused when ``parent`` holds
    processes itself and is not the root: the 'no internal processes' rule)."""
    if "memory" in _words(parent / "cgroup.subtree_control"):
        return True
    try:
        _write(parent / "cgroup.subtree_control", "+memory")
    except OSError:
        return False
    return "memory" in _words(parent / "cgroup.subtree_control")


def _write(path: Path, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _keyed(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None
