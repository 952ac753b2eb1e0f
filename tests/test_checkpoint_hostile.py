"""Hostile and changing checkpoint files: each case a fuzzer found, now a typed error naming the
file (or the right values), never silent garbage, an untyped crash or a hang."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import socket
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bigload import load_checkpoint_in_model
from bigload.checkpoint import CheckpointReader, _json, _safetensors, read_index
from bigload.errors import (
    CheckpointChangedError,
    CheckpointIndexError,
    CorruptCheckpointError,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
)
from hostile import as_unprivileged, deadline, public_dir, record, rezip


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def _all(index) -> dict[str, torch.Tensor]:
    with CheckpointReader(index) as reader:
        return {name: reader.get(name) for name in index}


# --- torch zips: records read as what they are, never as raw or borrowed bytes -----------------
def test_deflated_torch_zip_loads_the_values_torch_load_gives(tmp_path):
    tensors = {"w": torch.arange(8.0), "i": torch.arange(5), "h": torch.randn(3, 2).half()}
    file = tmp_path / "model.pt"
    file.write_bytes(rezip(_torch_bytes(tensors), method=zipfile.ZIP_DEFLATED))
    expected = torch.load(file, weights_only=True)  # without mmap, torch decompresses too
    got = _all(read_index(file))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor) and got[name].dtype == tensor.dtype


def test_record_shorter_than_its_tensor_is_refused(tmp_path):
    data = _torch_bytes({"w": torch.arange(8.0)})
    file = tmp_path / "model.pt"
    file.write_bytes(rezip(data, {"data/0": b"abc"}))  # 3 bytes for 8 floats
    with pytest.raises(CorruptCheckpointError,
                       match=re.escape(f"'{file}'") + ".*record 'data/0' holds 3 bytes.*32 bytes"):
        read_index(file)


@pytest.mark.parametrize("numel", [2**30, 2**60])
def test_storage_larger_than_its_record_allocates_nothing(tmp_path, numel):
    data = _torch_bytes({"w": torch.arange(8.0)})
    # the persistent id ('storage', FloatStorage, '0', 'cpu', 8): numel 8 ends the tuple
    pid_numel = re.compile(rb"K\x08(t(?:q.)?Q)", re.DOTALL)
    pickled, count = pid_numel.subn(b"\x8a\x08" + numel.to_bytes(8, "little") + rb"\1",
                                    record(data, "data.pkl"))  # LONG1 numel
    assert count == 1
    file = tmp_path / "model.pt"
    file.write_bytes(rezip(data, {"data.pkl": pickled}))
    with pytest.raises(CorruptCheckpointError, match=f"storage of {numel * 4} bytes"):
        read_index(file)


@pytest.mark.parametrize(
    ("pickled", "match"),
    [
        (b"\x80\x02h\x05.", "KeyError"),  # BINGET of a memo slot never set
        (b"\x80\x02s.", "IndexError"),  # SETITEM on an empty stack
        (b"\x80\x02}q\x00(X\x01", "malformed"),  # cut in the middle
        (b"\x80\x02\xff.", "malformed"),  # no such opcode
    ],
)
def test_malformed_pickle_is_a_corrupt_checkpoint(tmp_path, pickled, match):
    file = tmp_path / "model.pt"
    file.write_bytes(rezip(_torch_bytes({"w": torch.ones(2)}), {"data.pkl": pickled}))
    with pytest.raises(CorruptCheckpointError, match=f"(?s){re.escape(str(file))}.*{match}"):
        read_index(file)


@pytest.mark.parametrize(
    "pickled",
    [
        b"\x80\x02cbuiltins\nbytearray\n\x8a\x06" + (10**12).to_bytes(6, "little") + b"\x85R.",
        b"\x80\x02ctorch\nFloatTensor\n\x8a\x06" + (10**12).to_bytes(6, "little") + b"\x85R.",
    ],
)
def test_pickle_that_would_allocate_is_refused_before_it_runs(tmp_path, pickled):
    file = tmp_path / "model.pt"
    file.write_bytes(rezip(_torch_bytes({"w": torch.ones(2)}), {"data.pkl": pickled}))
    with pytest.raises(UnsafeCheckpointError, match="does not unpickle"):
        read_index(file)


def test_tensor_built_by_the_pickle_is_not_served(tmp_path):
    # {'w': torch.Tensor(4)}: uninitialised memory, not data of the file
    pickled = b"\x80\x02}X\x01\x00\x00\x00wctorch\nTensor\nK\x04\x85Rs."
    file = tmp_path / "model.pt"
    file.write_bytes(rezip(_torch_bytes({"w": torch.ones(2)}), {"data.pkl": pickled}))
    with pytest.raises(CorruptCheckpointError, match=r"\['w'\] are not stored in the file"):
        read_index(file)


def test_misaligned_stored_record_is_read_exactly(tmp_path):
    tensors = {"a": torch.arange(3, dtype=torch.uint8), "w": torch.randn(5).double()}
    file = tmp_path / "model.pt"
    file.write_bytes(rezip(_torch_bytes(tensors)))  # python's zipfile does not align records
    got = _all(read_index(file))
    assert all(torch.equal(got[name], tensor) for name, tensor in tensors.items())


# --- files that change after read_index ----------------------------------------------------------
def test_safetensors_replaced_after_indexing_is_refused(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4)}, file)
    index = read_index(tmp_path)
    save_file({"w": torch.zeros(4)}, file)  # a re-download, save_pretrained into the folder
    with CheckpointReader(index) as reader:
        with pytest.raises(CheckpointChangedError,
                           match=f"{re.escape(str(file))}.*read_index again"):
            reader.get("w")


def test_torch_file_saved_again_with_another_shape_is_refused(tmp_path):
    file = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.ones(4, 4), "bias": torch.ones(4)}, file)
    index = read_index(tmp_path)
    torch.save({"weight": torch.ones(2, 8), "bias": torch.ones(4)}, file)
    model = nn.Linear(4, 4)
    before = model.weight.detach().clone()
    with pytest.raises(CheckpointChangedError, match=re.escape(str(file))):
        load_checkpoint_in_model(model, index)
    assert model.weight.shape == (4, 4) and torch.equal(model.weight, before)


@pytest.mark.parametrize("what", ["header", "values"])
def test_rewrite_in_place_with_size_and_mtime_kept_is_refused(tmp_path, what):
    # what cp -p / rsync --inplace -t leave behind: same inode, size and mtime, other content
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4)}, file)
    before = file.stat()
    index = read_index(file)
    data = file.read_bytes()
    new = data.replace(b'"a"', b'"b"') if what == "header" else data[:-4] + bytes(4)
    with open(file, "r+b") as f:
        f.write(new)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = file.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)
    with pytest.raises(CheckpointChangedError, match=r"change time \(ns\) \d+ -> \d+"):
        CheckpointReader(index).get("a")


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_other_header_bytes_with_the_same_stat_are_refused(tmp_path, fmt):
    # the header comparison itself: the index says another header than the file now holds
    file = tmp_path / ("model.safetensors" if fmt == "safetensors" else "model.pt")
    save_file({"w": torch.ones(4)}, file) if fmt == "safetensors" else torch.save(
        {"w": torch.ones(4)}, file)
    index = read_index(file)
    other = dataclasses.replace(index.identities[file], content_id="0" * 64)
    index = dataclasses.replace(index, identities={file: other})
    with pytest.raises(CheckpointChangedError, match="its header bytes differ"):
        CheckpointReader(index).get("w")


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("change", ["removed", "emptied"])
def test_file_removed_or_emptied_after_indexing_is_refused(tmp_path, fmt, change):
    file = tmp_path / ("model.safetensors" if fmt == "safetensors" else "model.pt")
    save_file({"w": torch.ones(4)}, file) if fmt == "safetensors" else torch.save(
        {"w": torch.ones(4)}, file)
    index = read_index(file)
    file.unlink() if change == "removed" else file.write_bytes(b"")
    with pytest.raises(CheckpointChangedError, match=re.escape(str(file))) as info:
        CheckpointReader(index).get("w")
    assert ("was removed" if change == "removed" else "size ") in str(info.value)


def test_index_exposes_a_content_identity_per_file(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4)}, file)
    data = file.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    identity = read_index(file).identities[file]
    stat = file.stat()
    assert (identity.size, identity.mtime_ns, identity.ctime_ns, identity.inode) == (
        stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    expected = hashlib.sha256(f"{len(data)}\n".encode() + data[:header_end]).hexdigest()
    assert identity.content_id == expected
    save_file({"v": torch.ones(4)}, file)  # same size, other header
    assert read_index(file).identities[file].content_id != expected


def test_torch_content_identity_follows_the_records(tmp_path):
    file = tmp_path / "model.pt"
    file.write_bytes(rezip(_torch_bytes({"w": torch.ones(4)})))
    first = read_index(file).identities[file].content_id
    file.write_bytes(rezip(_torch_bytes({"w": torch.zeros(4)})))  # same size, other CRC
    assert read_index(file).identities[file].content_id != first


def test_index_built_by_hand_without_identities_is_read_unchecked(tmp_path):
    # e.g. the offload folder's packs: written by bigload, indexed from their header at once
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    index = dataclasses.replace(read_index(tmp_path), identities={})
    with CheckpointReader(index) as reader:
        assert torch.equal(reader.get("w"), torch.ones(1))


# --- safetensors headers -------------------------------------------------------------------------
_ENTRY = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (f'{{"w":{_ENTRY},"w":{_ENTRY}}}', "key 'w' appears twice"),  # the last won
        ('{"w":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}', r"unknown dtype \['F32'\]"),
        ('{"w":{"dtype":{"a":1},"shape":[1],"data_offsets":[0,4]}}', "unknown dtype"),
        ('{"w":' + "[" * 5000 + "]" * 5000 + "}", "nests deeper than 32 levels"),
        ('{"w":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],'
         '"data_offsets":[0,0]}}', "too large for any tensor"),
        ('{"w":{"dtype":"F32","shape":' + str([1] * 65) + ',"data_offsets":[0,4]}}',
         "65 dimensions"),
        ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,1e400]}}', "data_offsets"),
        ('{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', "shape"),
    ],
)
def test_hostile_safetensors_header_is_refused(tmp_path, header, match):
    file = _raw_safetensors(tmp_path / "model.safetensors", header.encode(), bytes(4))
    with pytest.raises(CorruptCheckpointError, match=f"(?s){re.escape(str(file))}.*{match}"):
        _all(read_index(file))


def test_header_over_the_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    file = tmp_path / "model.safetensors"
    file.write_bytes((_safetensors.MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}")
    monkeypatch.setattr(_json, "parse_object", lambda raw: pytest.fail("parsed"))
    with pytest.raises(CorruptCheckpointError, match="more than bigload reads.*save it as shards"):
        read_index(file)


@pytest.mark.slow
def test_header_at_the_cap_parses_in_bounded_time(tmp_path):
    # the smallest entries up to the cap: ~500,000 tensors, bounded by the cap, not by the file
    parts, size, i = [], 2, 0
    while size < _safetensors.MAX_HEADER_BYTES - 100:
        parts.append(f'"t{i}":{{"dtype":"U8","shape":[],"data_offsets":[{i},{i + 1}]}}')
        size, i = size + len(parts[-1]) + 1, i + 1
    header = ("{" + ",".join(parts) + "}").encode()
    assert len(header) <= _safetensors.MAX_HEADER_BYTES
    file = _raw_safetensors(tmp_path / "model.safetensors", header, bytes(i))
    with deadline(120):
        assert len(read_index(file)) == i


# --- shard indexes -------------------------------------------------------------------------------
def _folder_with_index(folder: Path, doc: object) -> Path:
    folder.mkdir(exist_ok=True)
    save_file({"a": torch.ones(2)}, folder / "s1.safetensors")
    text = doc if isinstance(doc, str) else json.dumps(doc)
    (folder / "model.safetensors.index.json").write_text(text)
    return folder


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"metadata": [1], "weight_map": {"a": "s1.safetensors"}}, "'metadata' is a list"),
        ({"weight_map": {"a": 3}}, r"value\(s\) are not shard file names.*'a': 3"),
        ({"weight_map": {"a": ["s1.safetensors"]}}, "not shard file names"),
        ({"weight_map": ["a"]}, "no 'weight_map'"),
        ('{"weight_map": ' + "[" * 3000 + "]" * 3000 + "}", "nests deeper"),
        ('{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}', "'a' appears twice"),
        ([1, 2], "JSON list, not an object"),
    ],
)
def test_hostile_shard_index_is_refused(tmp_path, doc, match):
    folder = _folder_with_index(tmp_path / "ckpt", doc)
    index_file = re.escape(str(folder / "model.safetensors.index.json"))
    with pytest.raises(CheckpointIndexError, match=f"(?s){index_file}.*{match}"):
        read_index(folder)


def test_shard_name_longer_than_the_file_system_allows(tmp_path):
    name = "x" * 300 + ".safetensors"
    folder = _folder_with_index(tmp_path / "ckpt", {"weight_map": {"a": name}})
    with pytest.raises(CheckpointIndexError, match="longer than the file system allows"):
        read_index(folder)


def test_checkpoint_path_longer_than_the_file_system_allows(tmp_path):
    with pytest.raises(UnreadableCheckpointError, match="longer than the file system allows"):
        read_index(tmp_path / ("x" * 300 + ".safetensors"))


# --- special files: refused before they are opened for reading -----------------------------------
def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


def _device(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


@pytest.mark.parametrize(("make", "kind"), [(_fifo, "a FIFO"), (_socket, "a socket"),
                                            (_device, "a character device")])
@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin",
                                  "model.safetensors.index.json"])
def test_special_file_named_like_a_checkpoint_is_refused_without_blocking(tmp_path, make, kind,
                                                                          name):
    path = make(tmp_path / name)
    with deadline(10):
        with pytest.raises(UnreadableCheckpointError, match=f"{re.escape(str(path))}' is {kind}"):
            read_index(tmp_path)
        if not name.endswith(".json"):
            with pytest.raises(UnreadableCheckpointError, match="not a regular file"):
                read_index(path)


def test_fifo_named_as_a_shard_is_refused_without_blocking(tmp_path):
    folder = _folder_with_index(tmp_path / "ckpt", {"weight_map": {"a": "s1.safetensors",
                                                                   "b": "s2.safetensors"}})
    _fifo(folder / "s2.safetensors")
    with deadline(10):
        with pytest.raises(CheckpointIndexError, match="s2.safetensors.*is a FIFO"):
            read_index(folder)


# --- permissions (as an unprivileged user: root reads everything) -------------------------------
def _read_index_outcome(path: Path) -> str:
    def run() -> str:
        read_index(path)
        return "loaded"

    return as_unprivileged(run)


@pytest.mark.parametrize("locked", ["shard", "index", "folder", "single"])
def test_unreadable_file_or_folder_is_a_typed_error(locked):
    with public_dir() as root:
        folder = root / "ckpt"
        folder.mkdir()
        folder.chmod(0o755)
        save_file({"a": torch.ones(2)}, folder / "s1.safetensors")
        doc = {"weight_map": {"a": "s1.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(doc))
        target = {"shard": folder / "s1.safetensors", "single": folder / "s1.safetensors",
                  "index": folder / "model.safetensors.index.json", "folder": folder}[locked]
        for path in folder.iterdir():
            path.chmod(0o644)
        target.chmod(0o311 if locked == "folder" else 0o200)
        outcome = _read_index_outcome(folder / "s1.safetensors" if locked == "single" else folder)
    assert outcome.startswith("UnreadableCheckpointError"), outcome
    assert f"cannot read '{target}': permission denied" in outcome
    assert "chmod a+r" in outcome
