"""CheckpointReader: zero-copy safetensors views, torch pickles, lifetime and threads."""

from __future__ import annotations

import ctypes
import json
import mmap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bigload.checkpoint import CheckpointReader, read_index
from bigload.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a.device, a.dtype, a.shape) == (torch.device("cpu"), b.dtype, b.shape)
    assert torch.equal(_bytes(a), _bytes(b))  # bytes: torch.equal has no float8 kernel


@pytest.fixture
def saved(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors", tensors


def _map_span(mm: mmap.mmap) -> range:
    base = torch.frombuffer(mm, dtype=torch.uint8).data_ptr()
    return range(base, base + len(mm))


def test_safetensors_values_dtypes_and_shapes(saved):
    file, tensors = saved
    with CheckpointReader(read_index(file)) as reader:
        for name, tensor in tensors.items():
            _assert_same(reader.get(name), tensor)


def test_safetensors_get_is_a_zero_copy_view_of_the_map(saved):
    file, _ = saved
    with CheckpointReader(read_index(file)) as reader:
        first, second = reader.get("f32"), reader.get("f32")
        assert first.data_ptr() == second.data_ptr()
        span = _map_span(reader.mmap_for(file))
        start, end = reader.index["f32"].byte_range
        assert first.data_ptr() == span.start + start
        assert all(reader.get(n).data_ptr() in span for n in reader.index if reader.index[n].numel)


def test_writes_to_a_tensor_never_reach_the_file(saved):
    file, tensors = saved
    before = file.read_bytes()
    with CheckpointReader(read_index(file)) as reader:
        reader.get("f32").add_(1)
    assert file.read_bytes() == before
    with CheckpointReader(read_index(file)) as reader:
        _assert_same(reader.get("f32"), tensors["f32"])


def test_misaligned_tensor_is_copied(tmp_path):
    value = torch.tensor([1.5, -2.0, 3.25])
    header = {"pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "w": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}  # fmt: skip
    text = json.dumps(header).encode()
    data = b"\x07" + _bytes(value).numpy().tobytes()
    file = tmp_path / "model.safetensors"
    file.write_bytes(len(text).to_bytes(8, "little") + text + data)
    with CheckpointReader(read_index(file)) as reader:
        assert reader.index["w"].byte_range[0] % 4 != 0
        tensor = reader.get("w")
        assert torch.equal(tensor, value)
        assert tensor.data_ptr() not in _map_span(reader.mmap_for(file))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_torch_pickle_values(tmp_path, suffix):
    tensors = {"w": torch.randn(4, 3), "t": torch.randn(3, 4).t(), "n": torch.tensor(7)}
    torch.save(tensors, tmp_path / f"weights{suffix}")
    with CheckpointReader(read_index(tmp_path / f"weights{suffix}")) as reader:
        for name, tensor in tensors.items():
            got = reader.get(name)
            assert got.is_contiguous() and type(got) is torch.Tensor
            assert torch.equal(got, tensor)


def test_torch_parameters_and_shared_storage(tmp_path):
    weight = torch.nn.Parameter(torch.randn(2, 2))
    torch.save({"a": weight, "b": weight}, tmp_path / "pytorch_model.bin")
    with CheckpointReader(read_index(tmp_path)) as reader:
        a, b = reader.get("a"), reader.get("b")
        assert not isinstance(a, torch.nn.Parameter) and torch.equal(a, weight.detach())
        assert a.data_ptr() == b.data_ptr()


def test_close_with_live_tensors_keeps_them_valid(saved):
    file, tensors = saved
    reader = CheckpointReader(read_index(file))
    alive = reader.get("f32")
    reader.close()
    reader.close()  # twice is fine
    _assert_same(alive, tensors["f32"])
    with pytest.raises(CheckpointError, match="closed"):
        reader.get("f32")


def test_close_releases_maps_when_no_tensor_is_alive(saved):
    file, _ = saved
    reader = CheckpointReader(read_index(file))
    reader.get("f32")
    mm = reader.mmap_for(file)
    reader.close()
    assert mm.closed


def test_concurrent_gets_open_each_file_once(saved):
    file, tensors = saved
    with CheckpointReader(read_index(file)) as reader:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(reader.get, list(tensors) * 8))
        assert reader.mmap_for(file) is reader.mmap_for(file)
        for tensor, expected in zip(got, list(tensors.values()) * 8):
            _assert_same(tensor, expected)
        # one map of the file: every tensor views it, each through a storage of its own bytes
        mm = reader.mmap_for(file)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        for tensor in (t for t in got if t.numel()):
            assert base <= tensor.data_ptr() < base + len(mm)
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_mmap_for_serves_madvise(saved):
    file, tensors = saved
    with CheckpointReader(read_index(file)) as reader:
        mm = reader.mmap_for(file)
        assert len(mm) == file.stat().st_size
        if hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED, 0, len(mm))
        _assert_same(reader.get("i64"), tensors["i64"])


def test_mmap_for_refuses_files_it_does_not_map(tmp_path, saved):
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
    with CheckpointReader(read_index(tmp_path / "other.pt")) as reader:
        with pytest.raises(ValueError, match="not a safetensors file"):
            reader.mmap_for(tmp_path / "other.pt")
    with CheckpointReader(read_index(saved[0])) as reader:
        with pytest.raises(ValueError, match="other.pt"):
            reader.mmap_for(tmp_path / "other.pt")


def test_unknown_name(saved):
    with CheckpointReader(read_index(saved[0])) as reader:
        with pytest.raises(KeyError, match="'nope' is not in checkpoint"):
            reader.get("nope")
