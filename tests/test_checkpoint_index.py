"""read_index: every layout, written by the real writers, and every kind of bad input."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bigload.checkpoint import CheckpointReader, _safetensors, read_index
from bigload.errors import (
    CheckpointIndexError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)


# --- fixtures and helpers ----------------------------------------------------------------------
def _tensors() -> dict[str, torch.Tensor]:
    """One tensor per stored dtype, plus a 0-dim scalar and a 0-element tensor."""
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f64": torch.randn(2, generator=g).double(),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "i32": torch.arange(3, dtype=torch.int32),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.arange(7, dtype=torch.uint8),
        "u16": torch.tensor([1, 2, 3], dtype=torch.uint16),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    assert torch.equal(_bytes(a), _bytes(b))  # bytes: torch.equal has no float8 kernel


def _assert_index_matches(index, tensors: dict[str, torch.Tensor], file: Path) -> None:
    assert set(index) == set(tensors)
    data = file.read_bytes()
    for name, tensor in tensors.items():
        entry = index[name]
        assert (entry.file, entry.dtype, entry.shape) == (file, tensor.dtype, tuple(tensor.shape))
        start, end = entry.byte_range
        assert data[start:end] == _bytes(tensor).numpy().tobytes()


def _assert_reader_matches(index, tensors: dict[str, torch.Tensor]) -> None:
    with CheckpointReader(index) as reader:
        for name, tensor in tensors.items():
            _assert_same(reader.get(name), tensor)


def _write_raw(path: Path, header: dict, data: bytes = b"") -> Path:
    """A safetensors file with exactly this header (no padding), for headers the writer refuses."""
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def _sharded(folder: Path, shards: dict[str, dict], weight_map: dict | None = None) -> Path:
    """Shards written with save_file and a model.safetensors.index.json (default: the truth)."""
    folder.mkdir(exist_ok=True)
    for shard, tensors in shards.items():
        save_file(tensors, folder / shard)
    truth = {name: shard for shard, tensors in shards.items() for name in tensors}
    doc = {"metadata": {"total_size": 1}, "weight_map": truth if weight_map is None else weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(doc))
    return folder


def _two_shards() -> dict[str, dict]:
    return {"s1.safetensors": {"a": torch.ones(2)}, "s2.safetensors": {"b": torch.zeros(3)}}


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, vocab_size=99,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder, max_shard_size="50KB")
    return folder.resolve(), {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- layouts -----------------------------------------------------------------------------------
def test_single_safetensors_file(tmp_path):
    tensors = _tensors()
    file = tmp_path / "weights.safetensors"
    save_file(tensors, file, metadata={"format": "pt"})
    index = read_index(file)
    assert (index.root, index.format, index.files) == (tmp_path, "safetensors", (file,))
    assert dict(index.metadata) == {"format": "pt"}
    assert index.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    ranges = [index[name].byte_range for name in index]
    assert ranges == sorted(ranges)  # entries in file order
    _assert_index_matches(index, tensors, file)
    _assert_reader_matches(index, tensors)


def test_folder_with_model_safetensors(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    index = read_index(str(tmp_path))
    assert index.files == (tmp_path / "model.safetensors",) and index.notes == ()
    _assert_index_matches(index, tensors, tmp_path / "model.safetensors")


def test_sharded_safetensors_from_save_pretrained(bert):
    folder, state_dict = bert
    index = read_index(folder)
    assert index.format == "safetensors" and len(index.files) > 1
    assert index.files == tuple(sorted(folder.glob("model-*.safetensors")))
    assert index.metadata["total_size"] == str(index.total_bytes)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for name, tensor in state_dict.items():
        entry = index[name]
        assert entry.file == folder / weight_map[name]
        assert (entry.dtype, entry.shape) == (tensor.dtype, tuple(tensor.shape))
        assert entry.byte_range[1] - entry.byte_range[0] == entry.nbytes
    _assert_reader_matches(index, state_dict)


def test_index_file_passed_directly(bert):
    folder, state_dict = bert
    index = read_index(folder / "model.safetensors.index.json")
    assert set(index) == set(state_dict) and index.root == folder


def test_unindexed_safetensors_shards_are_all_read(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "part-1.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "part-2.safetensors")
    index = read_index(tmp_path)
    assert list(index) == ["a", "b"] and len(index.files) == 2
    assert any("no shard index" in note for note in index.notes)


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_torch_pickle(tmp_path, file_name):
    tensors = {k: v for k, v in _tensors().items() if k != "f8"}
    torch.save(tensors, tmp_path / file_name)
    index = read_index(tmp_path if file_name == "pytorch_model.bin" else tmp_path / file_name)
    assert (index.format, index.files) == ("torch", (tmp_path / file_name,))
    for name, tensor in tensors.items():
        entry = index[name]
        assert (entry.dtype, entry.shape, entry.byte_range) == (tensor.dtype, tensor.shape, None)
    _assert_reader_matches(index, tensors)


def test_sharded_torch_bin(tmp_path):
    shards = {"pytorch_model-00001-of-00002.bin": {"a": torch.ones(2, 2)},
              "pytorch_model-00002-of-00002.bin": {"b": torch.arange(3)}}  # fmt: skip
    for shard, tensors in shards.items():
        torch.save(tensors, tmp_path / shard)
    weight_map = {name: shard for shard, tensors in shards.items() for name in tensors}
    doc = {"metadata": {"total_size": 40}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(doc))
    index = read_index(tmp_path)
    assert index.format == "torch" and index.files == tuple(tmp_path / s for s in shards)
    assert index["b"].file == tmp_path / "pytorch_model-00002-of-00002.bin"
    assert dict(index.metadata) == {"total_size": "40"}
    _assert_reader_matches(index, {"a": torch.ones(2, 2), "b": torch.arange(3)})


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_torch_nested_state_dict_is_unwrapped(tmp_path, key, caplog):
    tensors = {"w": torch.randn(2, 3)}
    torch.save({key: tensors, "epoch": 3}, tmp_path / "ckpt.pt")
    with caplog.at_level(logging.INFO, logger="bigload.checkpoint"):
        index = read_index(tmp_path / "ckpt.pt")
    assert list(index) == ["w"]
    assert any(f"under key '{key}'" in note for note in index.notes)
    assert f"under key '{key}'" in caplog.text
    _assert_reader_matches(index, tensors)


def test_torch_non_tensor_entries_are_skipped_with_a_note(tmp_path):
    torch.save({"w": torch.ones(1), "step": 7}, tmp_path / "model.pt")
    index = read_index(tmp_path / "model.pt")
    assert list(index) == ["w"]
    assert any("'step'" in note for note in index.notes)


def test_safetensors_preferred_over_bin(tmp_path, caplog):
    tensors = {"w": torch.ones(3)}
    save_file(tensors, tmp_path / "model.safetensors")
    torch.save({"w": torch.zeros(3)}, tmp_path / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="bigload.checkpoint"):
        index = read_index(tmp_path)
    assert index.format == "safetensors" and index.files == (tmp_path / "model.safetensors",)
    assert any("preferred safetensors" in note and "pytorch_model.bin" in note
               for note in index.notes)  # fmt: skip
    assert "preferred safetensors" in caplog.text
    _assert_reader_matches(index, tensors)


@pytest.mark.parametrize("metadata", [None, {"format": "tf"}, {"format": "flax"},
                                      {"format": "np"}, {"format": "mlx"}])  # fmt: skip
def test_foreign_or_missing_metadata_reads_plain_tensors(tmp_path, metadata, caplog):
    tensors = {"w": torch.randn(2, 2)}
    save_file(tensors, tmp_path / "model.safetensors", metadata=metadata)
    with caplog.at_level(logging.INFO, logger="bigload.checkpoint"):
        index = read_index(tmp_path)
    assert dict(index.metadata) == (metadata or {})
    assert "plain tensors" in caplog.text
    _assert_reader_matches(index, tensors)


class _Counting:
    """A file object that records how many bytes each read returned."""

    def __init__(self, f, sizes: list[int]):
        self._f, self._sizes = f, sizes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def read(self, n=-1):
        data = self._f.read(n)
        self._sizes.append(len(data))
        return data


def test_index_reads_headers_only(tmp_path, monkeypatch):
    tensors = {f"layer.{i}.weight": torch.full((256,), float(i)) for i in range(1000)}
    file = tmp_path / "model.safetensors"
    save_file(tensors, file)
    header_bytes = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    read_sizes: list[int] = []
    monkeypatch.setattr(_safetensors, "open", lambda *a, **k: _Counting(open(*a, **k), read_sizes),
                        raising=False)  # fmt: skip
    index = read_index(file)
    assert len(index) == 1000
    assert sum(read_sizes) == header_bytes < file.stat().st_size // 5


def test_index_is_immutable(tmp_path):
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    index = read_index(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        index.root = tmp_path  # type: ignore[misc]
    with pytest.raises(TypeError):
        index.entries["x"] = index["w"]  # type: ignore[index]
    with pytest.raises(KeyError, match="'nope' is not in checkpoint"):
        index["nope"]


# --- not found ---------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        read_index(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"(?s)Looked for.*model\.safetensors.*empty"):
        read_index(tmp_path)


def test_folder_without_weights_lists_what_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError) as info:
        read_index(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "config.json" in message
    assert "model.safetensors.index.json" in message and "pytorch_model.bin" in message


def test_file_of_unknown_kind(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="config.json' is not a checkpoint file"):
        read_index(tmp_path / "config.json")


# --- corrupt safetensors -----------------------------------------------------------------------
def test_truncated_safetensors_names_file_and_tensor(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4), "z_last": torch.ones(8)}, file)
    file.write_bytes(file.read_bytes()[:-4])
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(file))) as info:
        read_index(tmp_path)
    assert "'z_last'" in str(info.value) and "truncated" in str(info.value)
    assert "'a'" not in str(info.value)


def test_file_shorter_than_its_header(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4)}, file)
    file.write_bytes(file.read_bytes()[:20])
    with pytest.raises(CorruptCheckpointError, match=r"header length says \d+ bytes"):
        read_index(file)


def test_insane_header_length(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(file))):
        read_index(file)


def test_header_is_not_json(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes((9).to_bytes(8, "little") + b"{not json" + bytes(16))
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        read_index(file)


def test_header_whose_offsets_lie(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}
    file = _write_raw(tmp_path / "model.safetensors", header, bytes(16))
    with pytest.raises(CorruptCheckpointError, match=r"'w': data_offsets \[0, 8\).*needs 16"):
        read_index(file)


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "I32", "shape": [2], "data_offsets": [4, 12]}}  # fmt: skip
    file = _write_raw(tmp_path / "model.safetensors", header, bytes(12))
    with pytest.raises(CorruptCheckpointError, match="'b' bytes .* overlap 'a'"):
        read_index(file)


@pytest.mark.parametrize("entry, problem", [
    ({"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}, "unknown dtype 'F4'"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "shape"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "end before they start"),
    ({"dtype": "F32", "shape": [1]}, "lacks"),
])  # fmt: skip
def test_malformed_header_entry(tmp_path, entry, problem):
    file = _write_raw(tmp_path / "model.safetensors", {"w": entry}, bytes(8))
    with pytest.raises(CorruptCheckpointError, match=f"'w': .*{re.escape(problem)}"):
        read_index(file)


def test_all_problems_of_a_file_are_listed_once(tmp_path):
    header = {f"t{i:02d}": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}
              for i in range(15)}  # fmt: skip
    file = _write_raw(tmp_path / "model.safetensors", header, bytes(8))
    with pytest.raises(CorruptCheckpointError, match=r"\(15 problems\)") as info:
        read_index(file)
    assert "'t09'" in str(info.value) and "'t10'" not in str(info.value)
    assert "… and 5 more" in str(info.value)


# --- bad shard indexes -------------------------------------------------------------------------
def test_index_naming_a_missing_shard(tmp_path):
    weight_map = {"a": "s1.safetensors", "b": "s3.safetensors"}
    folder = _sharded(tmp_path / "ckpt", _two_shards(), weight_map)
    with pytest.raises(CheckpointIndexError, match=re.escape(str(folder / "s3.safetensors"))):
        read_index(folder)


@pytest.mark.parametrize("shard", ["../x.safetensors", "sub/../../x.safetensors",
                                   "/etc/x.safetensors"])  # fmt: skip
def test_index_escaping_its_folder(tmp_path, shard):
    save_file({"b": torch.zeros(3)}, tmp_path / "x.safetensors")
    folder = _sharded(tmp_path / "ckpt", _two_shards(), {"a": "s1.safetensors", "b": shard})
    with pytest.raises(UnsafeCheckpointError, match=re.escape(repr(shard))):
        read_index(folder)


def test_index_omitting_tensors(tmp_path):
    shards = {"s1.safetensors": {"a": torch.ones(2), "hidden": torch.ones(1)},
              "s2.safetensors": {"b": torch.zeros(3)}}  # fmt: skip
    folder = _sharded(tmp_path, shards, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(CheckpointIndexError, match="'hidden' is in shard 's1.safetensors' but not"):
        read_index(folder)


def test_tensor_in_two_shards(tmp_path):
    shards = {"s1.safetensors": {"a": torch.ones(2)},
              "s2.safetensors": {"a": torch.ones(2), "b": torch.zeros(3)}}  # fmt: skip
    folder = _sharded(tmp_path, shards, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(CheckpointIndexError, match="'a' is stored in 2 shards"):
        read_index(folder)


@pytest.mark.parametrize("where", ["'s1.safetensors'", "no shard the index names"])
def test_index_naming_the_wrong_shard(tmp_path, where):
    weight_map = {"a": "s2.safetensors", "b": "s2.safetensors"}
    if where != "no shard the index names":
        weight_map["c"] = "s1.safetensors"
    shards = {"s1.safetensors": {"a": torch.ones(2), "c": torch.ones(1)},
              "s2.safetensors": {"b": torch.zeros(3)}}  # fmt: skip
    folder = _sharded(tmp_path, shards, weight_map)
    with pytest.raises(CheckpointIndexError, match=re.escape(f"(it is in {where})")) as info:
        read_index(folder)
    assert "'a': the index says shard 's2.safetensors', which does not" in str(info.value)


def test_index_without_weight_map(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointIndexError, match="no 'weight_map'"):
        read_index(tmp_path)


# --- unsafe or unreadable pickles --------------------------------------------------------------
class _Custom:
    pass


def test_pickle_with_custom_object_is_refused(tmp_path):
    file = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(1), "extra": _Custom()}, file)
    with pytest.raises(UnsafeCheckpointError, match=f"(?s){re.escape(str(file))}.*_Custom") as info:
        read_index(tmp_path)
    assert info.value.__cause__ is not None


def test_legacy_torch_format_is_refused(tmp_path):
    file = tmp_path / "model.pt"
    torch.save({"w": torch.ones(1)}, file, _use_new_zipfile_serialization=False)
    with pytest.raises(CorruptCheckpointError, match="legacy format"):
        read_index(file)
