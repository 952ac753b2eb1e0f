"""Memory the process may use: cgroup v2 and v1 limits read from fake file trees (never this
machine's), nested limits, usage and page cache, malformed files, and budgets built on them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import bigload.memory
import bigload.plan.budgets
from bigload.devices import free_memory, memory_source
from bigload.memory import available_memory, cgroup_folders, host_available_bytes, memory_limit
from bigload.plan import plan_devices, read_budgets

GiB = 1 << 30
HOST = 21 * GiB
USED = 900 << 20  # in the 3 GiB job of the budget tests: 2172 MiB (2.1 GiB) free
V1_UNLIMITED = "9223372036854771712"


def fake_machine(root: Path, cgroup: str, files: dict[str, str], *, host: int | None = HOST,
                 mountinfo: str | None = None) -> Path:
    """A file tree with ``/proc/self/cgroup``, ``/proc/meminfo`` and the given cgroup files (a
    v1 or v2 hierarchy folder gets a ``cgroup.procs``, as a real one has)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    if host is not None:
        (root / "proc/meminfo").write_text(
            f"MemTotal:       {2 * host // 1024} kB\nMemAvailable:   {host // 1024} kB\n")
    if mountinfo is not None:
        (root / "proc/self/mountinfo").write_text(mountinfo)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        (path.parent / "cgroup.procs").touch()
    return root


def v2(root: Path, path: str, files: dict[str, dict[str, str]], **kwargs) -> Path:
    """cgroup v2: ``files`` maps a cgroup (relative to /sys/fs/cgroup) to its files."""
    flat = {f"sys/fs/cgroup/{group}/{name}".replace("//", "/"): text
            for group, named in files.items() for name, text in named.items()}
    return fake_machine(root, f"0::{path}\n", flat, **kwargs)


def v1(root: Path, path: str, files: dict[str, dict[str, str]], **kwargs) -> Path:
    flat = {f"sys/fs/cgroup/memory/{group}/{name}".replace("//", "/"): text
            for group, named in files.items() for name, text in named.items()}
    cgroup = f"5:cpu,cpuacct:{path}\n4:memory:{path}\n1:name=systemd:{path}\n"
    return fake_machine(root, cgroup, flat, **kwargs)


def stat(inactive_file: int, key: str = "inactive_file") -> str:
    return f"anon 1000\nfile 5000\nactive_file 7\n{key} {inactive_file}\nslab 12\n"


# --- limits ------------------------------------------------------------------------------------
def test_v2_limit_less_usage_is_available(tmp_path):
    root = v2(tmp_path, "/job", {"job": {"memory.max": str(3 * GiB), "memory.high": "max",
                                         "memory.current": str(GiB), "memory.stat": stat(0)}})
    limit = memory_limit(root=root)
    assert limit is not None
    assert (limit.limit_bytes, limit.used_bytes, limit.free_bytes) == (3 * GiB, GiB, 2 * GiB)
    assert limit.limit_file == "/sys/fs/cgroup/job/memory.max"
    available = available_memory(root=root)
    assert available.size_bytes == 2 * GiB
    assert memory_source(available) == ("2.0 GiB free under the cgroup limit 3.0 GiB "
                                "(memory.max of /sys/fs/cgroup/job)")


def test_v2_memory_high_counts_when_lower(tmp_path):
    root = v2(tmp_path, "/job", {"job": {"memory.max": str(3 * GiB), "memory.high": str(2 * GiB),
                                         "memory.current": "0"}})
    limit = memory_limit(root=root)
    assert limit is not None and limit.limit_bytes == 2 * GiB
    assert limit.limit_file.endswith("/job/memory.high")


def test_v1_limit_less_usage_is_available(tmp_path):
    root = v1(tmp_path, "/job", {
        "": {"memory.limit_in_bytes": V1_UNLIMITED, "memory.usage_in_bytes": str(9 * GiB)},
        "job": {"memory.limit_in_bytes": str(3 * GiB), "memory.usage_in_bytes": str(GiB),
                "memory.stat": stat(GiB // 2, key="total_inactive_file") + "inactive_file 1\n"},
    })
    available = available_memory(root=root)
    assert available.size_bytes == 3 * GiB - GiB // 2  # total_inactive_file, hierarchical
    assert "memory.limit_in_bytes of /sys/fs/cgroup/memory/job" in memory_source(available)


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_smallest_ancestor_limit_wins(tmp_path, layout):
    files = {"a": {"memory.max": str(2 * GiB), "memory.current": "0"},
             "a/b": {"memory.max": str(4 * GiB), "memory.current": "0"},
             "a/b/c": {"memory.current": "0"}}  # no limit of its own
    if layout == "v1":
        files = {group: {name.replace("memory.max", "memory.limit_in_bytes")
                         .replace("memory.current", "memory.usage_in_bytes"): text
                         for name, text in named.items()} for group, named in files.items()}
        root = v1(tmp_path, "/a/b/c", files)
    else:
        root = v2(tmp_path, "/a/b/c", files)
    limit = memory_limit(root=root)
    assert limit is not None and limit.limit_bytes == 2 * GiB
    assert Path(limit.limit_file).parent.name == "a"


def test_the_limit_with_least_free_memory_wins(tmp_path):
    # the parent allows more, but its other children already use most of it
    root = v2(tmp_path, "/a/b", {
        "a": {"memory.max": str(8 * GiB), "memory.current": str(7 * GiB)},
        "a/b": {"memory.max": str(4 * GiB), "memory.current": str(GiB // 2)},
    })
    assert available_memory(root=root).size_bytes == GiB
    assert "limit 8.0 GiB" in memory_source(available_memory(root=root))


@pytest.mark.parametrize(("layout", "unlimited"), [("v2", "max"), ("v1", V1_UNLIMITED)])
def test_no_limit_means_host_ram(tmp_path, layout, unlimited):
    if layout == "v2":
        root = v2(tmp_path, "/job", {"job": {"memory.max": unlimited, "memory.current": "5"}})
    else:
        root = v1(tmp_path, "/job", {"job": {"memory.limit_in_bytes": unlimited}})
    assert memory_limit(root=root) is None
    assert available_memory(root=root).size_bytes == HOST
    assert memory_source(available_memory(root=root)) == "available RAM (21.0 GiB)"


def test_a_limit_above_host_ram_leaves_host_ram(tmp_path):
    root = v2(tmp_path, "/job", {"job": {"memory.max": str(64 * GiB), "memory.current": "0"}})
    assert memory_limit(root=root) is not None
    assert available_memory(root=root).size_bytes == HOST


@pytest.mark.parametrize(
    ("current", "inactive", "free"),
    [(GiB, 0, 2 * GiB),  # usage subtracted
     (int(2.5 * GiB), int(1.5 * GiB), 2 * GiB),  # inactive page cache is reclaimable
     (5 * GiB, 0, 0)],  # over the limit (memory.high): nothing free, never negative
)
def test_usage_and_page_cache(tmp_path, current, inactive, free):
    root = v2(tmp_path, "/job", {"job": {"memory.max": str(3 * GiB),
                                         "memory.current": str(current),
                                         "memory.stat": stat(inactive)}})
    assert available_memory(root=root).size_bytes == free


def test_container_mount_shows_its_own_cgroup_as_root(tmp_path):
    # docker without a cgroup namespace: /proc/self/cgroup names /docker/abc, which is mounted
    # at /sys/fs/cgroup/memory
    mountinfo = ("30 25 0:26 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup "
                 "rw,memory\n21 1 0:19 / /sys rw - sysfs sysfs rw\n")
    root = v1(tmp_path, "/docker/abc", {"": {"memory.limit_in_bytes": str(3 * GiB),
                                             "memory.usage_in_bytes": "0"}}, mountinfo=mountinfo)
    assert [(v, f.relative_to(root)) for v, f, _ in cgroup_folders(root)] == [
        ("v1", Path("sys/fs/cgroup/memory"))]
    assert available_memory(root=root).size_bytes == 3 * GiB


def test_v2_namespace_root_with_a_limit(tmp_path):
    mountinfo = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    (tmp_path / "sys/fs/cgroup").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/cgroup.controllers").write_text("cpu memory pids\n")
    root = v2(tmp_path, "/", {"": {"memory.max": str(GiB), "memory.current": "0"}},
              mountinfo=mountinfo)
    assert available_memory(root=root).size_bytes == GiB


def test_hybrid_v1_memory_and_empty_v2(tmp_path):
    mountinfo = ("30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
                 "31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    root = fake_machine(
        tmp_path, "4:memory:/job\n0::/\n",
        {"sys/fs/cgroup/memory/job/memory.limit_in_bytes": str(GiB),
         "sys/fs/cgroup/unified/cgroup.controllers": ""},
        mountinfo=mountinfo,
    )
    assert available_memory(root=root).size_bytes == GiB


# --- malformed and missing files ---------------------------------------------------------------
def test_malformed_files_are_ignored_with_a_debug_log(tmp_path, caplog):
    root = v2(tmp_path, "/a/b", {
        "a": {"memory.max": "lots", "memory.current": "0"},
        "a/b": {"memory.max": str(2 * GiB), "memory.current": "1e9",
                "memory.stat": "inactive_file many\n"},
    })
    (root / "proc/self/cgroup").write_text("garbage\n0::/a/b\n::\n7:memory\n")
    with caplog.at_level(logging.DEBUG, logger="bigload.memory"):
        available = available_memory(root=root)
    assert available.size_bytes == 2 * GiB  # unreadable usage counts as 0
    logged = caplog.text
    assert "'lots' is not a number of bytes" in logged
    assert "'1e9' is not a number of bytes" in logged
    assert "inactive_file many" in logged


def test_no_cgroup_files_means_host_ram(tmp_path):
    root = fake_machine(tmp_path, "", {})
    (root / "proc/self/cgroup").unlink()
    assert memory_limit(root=root) is None
    assert available_memory(root=root).size_bytes == HOST


def test_without_meminfo_host_ram_comes_from_psutil(tmp_path):
    root = fake_machine(tmp_path, "", {}, host=None)
    assert host_available_bytes(root=root) > 0


# --- budgets -----------------------------------------------------------------------------------
@pytest.fixture
def three_gib_job(tmp_path, monkeypatch):
    """This process seen inside a v2 cgroup of 3 GiB with 900 MiB in use, on a CPU machine."""
    root = v2(tmp_path, "/job", {"job": {"memory.max": str(3 * GiB),
                                         "memory.current": str(USED),
                                         "memory.stat": stat(0)}})
    monkeypatch.setattr(bigload.memory, "SYSTEM_ROOT", root)
    monkeypatch.setattr(bigload.plan.budgets, "accelerator_type", lambda: None)
    return root


def test_free_memory_of_cpu_names_its_source(three_gib_job):
    free = free_memory(torch.device("cpu"))
    assert free.size_bytes == 3 * GiB - USED
    assert free.source.startswith("2.1 GiB free under the cgroup limit 3.0 GiB (memory.max of ")


def test_detected_cpu_budget_is_a_fraction_of_the_cgroup_free_memory(three_gib_job):
    budgets = read_budgets(None)
    assert budgets.limits["cpu"] == int(0.9 * (3 * GiB - USED))
    assert budgets.sources["cpu"] == ("90% of 2.1 GiB free under the cgroup limit 3.0 GiB "
                                      "(memory.max of /sys/fs/cgroup/job)")
    assert read_budgets({"cpu": "1GiB"}).sources["cpu"] == "given"


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(256, 256, bias=False) for _ in range(16))


def test_plan_without_max_memory_stays_within_the_cgroup(tmp_path, monkeypatch):
    # 16 blocks of 256 KiB (fp32) = 4 MiB under a cgroup with 2 MiB free: half goes to disk
    root = v2(tmp_path, "/job", {"job": {"memory.max": str(3 * GiB),
                                         "memory.current": str(3 * GiB - 2 * 2**20)}})
    monkeypatch.setattr(bigload.memory, "SYSTEM_ROOT", root)
    monkeypatch.setattr(bigload.plan.budgets, "accelerator_type", lambda: None)
    with torch.device("meta"):
        model = Blocks()
    plan = plan_devices(model, no_split_module_classes=["Linear"])
    budget = int(0.9 * 2 * 2**20)
    assert plan.budgets["cpu"] == budget
    assert 0 < plan.bytes_per_device["cpu"] <= budget
    assert plan.bytes_per_device["disk"] >= 4 * 2**20 - budget
    assert "90% of 2.0 MiB free under the cgroup limit 3.0 GiB (memory.max of " \
           "/sys/fs/cgroup/job)" in str(plan)


def test_free_memory_of_an_accelerator_is_what_torch_reports(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * GiB, 8 * GiB))
    free = free_memory(torch.device("cuda", 0))
    assert (free.size_bytes, free.source) == (5 * GiB, "free memory of cuda:0")
