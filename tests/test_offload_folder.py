"""Offload folders under faults and concurrency: the checks that run before any tensor moves, a
full filesystem, packs that do not validate, killed writes, two processes at once, and content
identity of checkpoint files (rewritten in place with size and mtime kept, copied with cp -p)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import bigload
import bigload.offload.folder as folder_module
import bigload.offload.packs as packs_module
import bigload.offload.sources as sources_module
from bigload import init_empty_weights, load_checkpoint_and_dispatch
from bigload.checkpoint import read_index
from bigload.errors import OffloadError
from bigload.offload import MANIFEST_FILE
from bigload.offload.packs import read_pack
from conftest import NestedBlocksModel

DISK_LAYERS = {"embed": "cpu", "layers": "disk", "norm": "cpu"}
WORKER = Path(__file__).with_name("offload_worker.py")


def skeleton(**kwargs) -> nn.Module:
    with init_empty_weights():
        return NestedBlocksModel(**kwargs)


def all_meta(model: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())


def packs(folder: Path) -> list[Path]:
    return sorted(folder.glob("bigload-pack-*.pack"))


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def load(checkpoint: Path, folder: Path, model: nn.Module | None = None, **kwargs) -> nn.Module:
    return load_checkpoint_and_dispatch(model if model is not None else skeleton(), checkpoint,
                                        device_map=kwargs.pop("device_map", DISK_LAYERS),
                                        offload_folder=folder, **kwargs)


def bf16_reference(state_dict: dict[str, torch.Tensor], **kwargs) -> nn.Module:
    model = NestedBlocksModel(**kwargs).eval()
    model.load_state_dict({k: v.bfloat16().float() for k, v in state_dict.items()})
    return model


def worker_env() -> dict[str, str]:
    src = Path(bigload.__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(WORKER.parent)])}


def worker(*args: object, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def results(process: subprocess.Popen, timeout: float = 180) -> list[dict]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path``; the test is skipped where this machine refuses mounts."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def eager() -> NestedBlocksModel:
    torch.manual_seed(0)
    return NestedBlocksModel().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def bf16_file(tmp_path, eager) -> Path:
    path = tmp_path / "ckpt" / "model.safetensors"
    path.parent.mkdir()
    save_file({k: v.bfloat16() for k, v in eager.state_dict().items()}, path)
    return path


@pytest.fixture
def expected_file(tmp_path, eager, x) -> Path:
    path = tmp_path / "expected.pt"
    with torch.no_grad():
        torch.save({"x": x, "y": bf16_reference(eager.state_dict())(x)}, path)
    return path


@pytest.fixture
def cache_now(monkeypatch) -> None:
    """Record digests of files written a moment ago (the racy window is for real clocks)."""
    monkeypatch.setattr(sources_module, "RACY_NS", 0)


# --- checks before any tensor moves --------------------------------------------------------------

def test_a_path_that_is_a_file_is_refused_before_loading(tmp_path, bf16_file):
    path = tmp_path / "offload"
    path.write_text("mine")
    model = skeleton()
    with pytest.raises(OffloadError, match=f"'{path}' is a file, not a folder.*Pass the path"):
        load(bf16_file, path, model)
    assert all_meta(model) and path.read_text() == "mine"


def test_a_path_under_a_file_is_refused_before_loading(tmp_path, bf16_file):
    blocker = tmp_path / "offload"
    blocker.write_text("mine")
    model = skeleton()
    with pytest.raises(OffloadError, match=f"cannot be created: '{blocker}' is a file"):
        load(bf16_file, blocker / "a" / "b", model)
    assert all_meta(model) and blocker.read_text() == "mine"


def test_a_read_only_filesystem_is_refused_before_loading(tmp_path, bf16_file):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mounted:
        for folder in (mounted, mounted / "new"):
            model = skeleton()
            with pytest.raises(OffloadError, match=f"'{folder}' is on a read-only filesystem"
                               ".*on a writable filesystem"):
                load(bf16_file, folder, model)
            assert all_meta(model)
        assert not any(mounted.iterdir())


def refusals(checkpoint: Path, expected_file: Path, folders: list[Path], warm_up: Path
             ) -> dict[Path, str]:
    """The error message of a load into each of ``folders`` by a user without root's rights:
    this process, or as root a child that drops to uid 65534 (after importing everything as
    root: the Python it runs may live under /root)."""
    if os.getuid() != 0:
        messages = {}
        for folder in folders:
            with pytest.raises(OffloadError) as info:
                load(checkpoint, folder)
            messages[folder] = str(info.value)
        return messages
    got = results(worker(checkpoint, expected_file, *folders, "--as-nobody", "--warm-up",
                         warm_up))
    assert all(r["error"] == "OffloadError" for r in got), got
    return {Path(r["folder"]): r["message"] for r in got}


def test_folders_this_process_cannot_write_or_read_are_refused(bf16_file, expected_file):
    base = Path(tempfile.mkdtemp(prefix="bigload-access-"))  # outside tmp_path: 0700 parents
    read_only, unlistable, closed = base / "read-only", base / "unlistable", base / "closed"
    try:
        base.chmod(0o755)
        checkpoint = base / "model.safetensors"
        shutil.copy(bf16_file, checkpoint)
        checkpoint.chmod(0o644)
        for folder, mode in ((read_only, 0o555), (unlistable, 0o333), (closed, 0o700)):
            folder.mkdir()
            folder.chmod(mode)
        if os.getuid() != 0:
            closed.chmod(0o000)
        messages = refusals(checkpoint, expected_file, [read_only, unlistable, read_only / "new",
                                                        closed / "offload"], base / "warm")
        uid = 65534 if os.getuid() == 0 else os.getuid()
        assert f"'{read_only}' is not writable by this process (uid {uid})" in (
            messages[read_only])
        assert f"'{unlistable}' cannot be listed or read by this process" in messages[unlistable]
        assert f"'{read_only / 'new'}' is not accessible to this process (creating it" in (
            messages[read_only / "new"])
        assert f"'{closed / 'offload'}' is not accessible to this process (looking it up" in (
            messages[closed / "offload"])
        assert all("fix this folder's permissions" in m for m in messages.values())
        assert not any(read_only.iterdir())
    finally:
        if closed.exists():
            closed.chmod(0o700)
        shutil.rmtree(base)


@pytest.mark.parametrize("content", [b"[1, 2]", b"\x00\xffgarbage", b'{"fingerprint": "abc"}',
                                     b'{"format": "bigload offload manifest", "version": 99}'],
                         ids=["json-list", "garbage", "other-json", "other-version"])
def test_a_manifest_bigload_did_not_write_is_refused_and_kept(tmp_path, bf16_file, content):
    folder = tmp_path / "offload"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_bytes(content)
    model = skeleton()
    with pytest.raises(OffloadError, match=f"'{folder / MANIFEST_FILE}' is not a manifest "
                       "bigload wrote.*delete it"):
        load(bf16_file, folder, model)
    assert all_meta(model)
    assert (folder / MANIFEST_FILE).read_bytes() == content and not packs(folder)


def test_a_manifest_that_cannot_be_written_is_a_warning_not_a_failed_load(
        tmp_path, bf16_file, eager, x, monkeypatch, caplog, cache_now):
    def full(folder: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sources_module, "sync_folder", full)
    folder = tmp_path / "offload"
    with caplog.at_level(logging.WARNING, logger="bigload.offload.sources"):
        model = load(bf16_file, folder)
    assert f"could not write '{folder / MANIFEST_FILE}'" in caplog.text
    assert torch.equal(model(x), bf16_reference(eager.state_dict())(x))
    assert len(packs(folder)) == 1 and not temporaries(folder)


# --- a full filesystem -------------------------------------------------------------------------

def test_no_space_while_writing_is_an_error_with_the_bytes_and_leaves_nothing(
        tmp_path, bf16_file, eager, x, monkeypatch):
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    folder = tmp_path / "offload"
    monkeypatch.setattr(os, "fsync", full)  # where delayed allocation reports a full disk
    model = skeleton()
    with pytest.raises(OffloadError, match=rf"'{folder}' has no room .* need \d+ bytes, its "
                       r"filesystem has \d+ bytes free.*Free space there"):
        load(bf16_file, folder, model)
    assert all_meta(model)
    assert not packs(folder) and not temporaries(folder)
    monkeypatch.undo()
    assert torch.equal(load(bf16_file, folder)(x), bf16_reference(eager.state_dict())(x))


@pytest.mark.parametrize("when", ["checked-before", "found-while-writing"])
def test_a_full_tmpfs_is_an_error_with_the_bytes_needed_and_free(tmp_path, when, monkeypatch):
    torch.manual_seed(0)
    big = NestedBlocksModel(n=64)
    path = tmp_path / "big.safetensors"
    save_file({k: v.bfloat16() for k, v in big.state_dict().items()}, path)
    needed = sum(v.numel() * 4 for k, v in big.state_dict().items() if k.startswith("layers."))
    if when == "found-while-writing":
        monkeypatch.setattr(packs_module, "check_room", lambda *args: None)
    with tmpfs(tmp_path / "small", "size=64k") as folder:
        model = skeleton(n=64)
        with pytest.raises(OffloadError, match=f"'{folder}' has no room") as info:
            load(path, folder, model)
        assert all_meta(model)
        found = int(str(info.value).split(" bytes,")[0].rsplit(" ", 1)[1])
        assert needed < found < needed + 4096  # the values and the header
        assert "bytes free" in str(info.value)
        assert not packs(folder) and not temporaries(folder)


# --- packs that do not validate, temporaries a killed write left ---------------------------------

@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign-safetensors"])
def test_a_pack_that_does_not_validate_is_ignored_reported_and_kept(
        tmp_path, bf16_file, eager, x, caplog, damage):
    folder = tmp_path / "offload"
    load(bf16_file, folder)
    [pack] = packs(folder)
    if damage == "truncated":
        os.truncate(pack, pack.stat().st_size - 4)
    elif damage == "garbage":
        pack.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    else:
        save_file({"a": torch.zeros(3)}, pack)
    damaged = pack.read_bytes()
    with caplog.at_level(logging.WARNING, logger="bigload.offload.packs"):
        model = load(bf16_file, folder)
    assert f"ignoring '{pack}'" in caplog.text
    assert model.bigload_report.bytes_written > 0 and len(packs(folder)) == 2
    assert pack.read_bytes() == damaged
    assert torch.equal(model(x), bf16_reference(eager.state_dict())(x))


def test_only_temporaries_of_bigloads_own_naming_are_removed(tmp_path, bf16_file):
    folder = tmp_path / "offload"
    folder.mkdir()
    stale = [folder / ".bigload-pack-0123456789abcdef.tmp",
             folder / ".bigload-manifest-fedcba9876543210.tmp"]
    kept = [folder / ".bigload-pack-notmine.tmp", folder / "bigload-pack-0123456789abcdef.tmp",
            folder / "x.tmp"]
    for path in stale + kept:
        path.write_text("left")
    load(bf16_file, folder)
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "left" for p in kept)


def test_a_write_killed_midway_is_cleaned_up_and_redone_by_the_next_load(
        tmp_path, bf16_file, expected_file, eager, x):
    folder = tmp_path / "offload"
    process = worker(bf16_file, expected_file, folder, "--slow", "0.5")
    try:
        deadline = time.monotonic() + 60
        while not (folder.is_dir() and temporaries(folder)):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert len(temporaries(folder)) == 1 and not packs(folder)  # what the kill left
    model = load(bf16_file, folder)
    assert not temporaries(folder) and len(packs(folder)) == 1
    assert torch.equal(model(x), bf16_reference(eager.state_dict())(x))


# --- two processes at once -----------------------------------------------------------------------

def test_two_processes_loading_into_one_new_folder_both_succeed(tmp_path, bf16_file,
                                                                 expected_file):
    folders = [tmp_path / f"offload-{i}" for i in range(3)]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    running = [worker(bf16_file, expected_file, *folders, "--slow", "0.02", "--barrier",
                      barrier, "--name", name) for name in ("a", "b")]
    got = [results(process) for process in running]
    for i, folder in enumerate(folders):
        rounds = [r[i] for r in got]
        assert all(r["equal"] for r in rounds)
        assert sorted(r["written"] == 0 for r in rounds) == [False, True]  # one wrote
        assert len(packs(folder)) == 1 and not temporaries(folder)


# --- content identity ---------------------------------------------------------------------------

def rewrite_in_place(path: Path, name: str, values: torch.Tensor) -> None:
    """Overwrite tensor ``name``'s bytes in place, then restore the file's mtime (as rsync -t,
    cp -p or touch -r leave it): only ctime tells that the content changed."""
    before = path.stat()
    start, end = read_index(path).entries[name].byte_range
    data = values.bfloat16().contiguous().view(torch.uint8).numpy().tobytes()
    assert len(data) == end - start
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_checkpoint_rewritten_with_size_and_mtime_kept_is_not_served_stale(
        tmp_path, bf16_file, eager, x, cache_now):
    folder = tmp_path / "offload"
    load(bf16_file, folder)
    assert (folder / MANIFEST_FILE).is_file()  # digests cached under the file's identity
    [first] = packs(folder)
    first_bytes = first.read_bytes()
    name = "layers.1.mlp.0.weight"
    new = torch.randn(eager.layers[1].mlp[0].weight.shape)
    rewrite_in_place(bf16_file, name, new)
    model = load(bf16_file, folder)
    assert len(packs(folder)) == 2 and first.read_bytes() == first_bytes
    [added] = [p for p in packs(folder) if p != first]
    assert len(read_pack(added).index.entries) == 1  # only the changed tensor
    assert torch.equal(model.layers[1].mlp[0].weight, new.bfloat16().float())
    state = eager.state_dict()
    state[name] = new
    assert torch.equal(model(x), bf16_reference(state)(x))


def test_a_copy_keeping_mtime_is_recognised_by_content(tmp_path, bf16_file, eager, x, cache_now):
    folder = tmp_path / "offload"
    load(bf16_file, folder)
    copy = tmp_path / "copy" / "model.safetensors"
    copy.parent.mkdir()
    shutil.copy2(bf16_file, copy)  # cp -p: another inode and ctime, same values
    model = load(copy, folder)
    assert model.bigload_report.bytes_written == 0 and len(packs(folder)) == 1
    assert torch.equal(model(x), bf16_reference(eager.state_dict())(x))


def test_an_unchanged_checkpoint_is_not_read_again_to_find_its_tensors(
        tmp_path, bf16_file, monkeypatch, cache_now):
    folder = tmp_path / "offload"
    load(bf16_file, folder)
    hashed = []
    real = folder_module.source_digest
    monkeypatch.setattr(folder_module, "source_digest", lambda t: hashed.append(t) or real(t))
    model = load(bf16_file, folder)
    assert model.bigload_report.bytes_written == 0
    assert hashed == []


def test_a_changed_budget_converts_only_the_newly_disk_placed_tensors(
        tmp_path, bf16_file, eager, x, cache_now):
    folder = tmp_path / "offload"
    fewer = {"embed": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "disk",
             "norm": "cpu"}
    first = load(bf16_file, folder, device_map=fewer)
    [pack] = packs(folder)
    pack_bytes = pack.read_bytes()
    second = load(bf16_file, folder)  # layers.0 now on disk too
    [added] = [p for p in packs(folder) if p != pack]
    assert pack.read_bytes() == pack_bytes
    layer0 = [k for k in eager.state_dict() if k.startswith("layers.0.")]
    assert len(read_pack(added).index.entries) == len(layer0)
    assert second.bigload_report.bytes_written == added.stat().st_size
    reference = bf16_reference(eager.state_dict())
    assert torch.equal(first(x), reference(x)) and torch.equal(second(x), reference(x))


def test_a_pack_is_a_valid_safetensors_file_named_by_content_keys(tmp_path, bf16_file, eager):
    folder = tmp_path / "offload"
    model = load(bf16_file, folder)
    [pack] = packs(folder)
    assert stat.S_ISREG(pack.stat().st_mode)
    with safe_open(str(pack), "pt") as f:  # safetensors' own reader: no holes, no overlaps
        names = list(f.keys())
        served = {f.get_tensor(n).float().sum().item() for n in names}
        metadata = f.metadata()
    assert metadata["writer"] == "bigload offload pack"
    assert all(len(n) == 8 + 1 + 64 for n in names)
    layer_sums = {t.float().sum().item() for k, t in model.state_dict().items()
                  if k.startswith("layers.")}
    assert served == layer_sums
