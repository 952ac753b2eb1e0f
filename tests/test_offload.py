"""Offloaded weights: disk tensors served from the checkpoint's own safetensors files (nothing
written), a fingerprinted offload folder written once when a conversion is needed and reused
after, foreign or half-written folders refused, and pages fetched ahead / released after use."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import bigload.offload.folder as folder_module
from bigload import disk_offload, init_empty_weights, load_checkpoint_and_dispatch
from bigload.checkpoint import CheckpointReader, read_index
from bigload.errors import OffloadError
from bigload.offload import FINGERPRINT_FILE, OffloadStore, stored_views
from conftest import ChainModel, NestedBlocksModel, all_tensors

DISK_LAYERS = {"embed": "cpu", "layers": "disk", "norm": "cpu"}


def skeleton(cls=NestedBlocksModel, **kwargs) -> nn.Module:
    with init_empty_weights():
        return cls(**kwargs)


def all_meta(model: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: to show a folder was left alone."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def eager() -> NestedBlocksModel:
    torch.manual_seed(0)
    return NestedBlocksModel().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def fp32_file(tmp_path, eager) -> Path:
    path = tmp_path / "ckpt" / "model.safetensors"
    path.parent.mkdir()
    save_file(eager.state_dict(), path)
    return path


@pytest.fixture
def bf16_file(tmp_path, eager) -> Path:
    path = tmp_path / "ckpt16" / "model.safetensors"
    path.parent.mkdir()
    save_file({k: v.bfloat16() for k, v in eager.state_dict().items()}, path)
    return path


def eager_from_bf16(eager: nn.Module) -> nn.Module:
    model = NestedBlocksModel().eval()
    model.load_state_dict({k: v.bfloat16().float() for k, v in eager.state_dict().items()})
    return model


# --- disk tier straight from the checkpoint -----------------------------------------------------

def test_disk_offload_of_matching_dtype_writes_nothing(tmp_path, fp32_file, eager, x):
    folder = tmp_path / "offload"
    model = load_checkpoint_and_dispatch(skeleton(), fp32_file, device_map=DISK_LAYERS,
                                         offload_folder=folder)
    report = model.bigload_report
    assert report.bytes_written == 0
    assert report.offload_folder is None
    assert not folder.exists()
    disk = [n for n in report.loaded if n.startswith("layers.")]
    assert report.zero_copy == len(disk) > 0  # the disk tier: views of the checkpoint file
    assert torch.equal(model(x), eager(x))


def test_disk_weights_are_views_of_the_checkpoint_file(fp32_file):
    model = load_checkpoint_and_dispatch(skeleton(), fp32_file, device_map={"": "disk"})
    size = fp32_file.stat().st_size
    assert {t.untyped_storage().nbytes() for t in all_tensors(model).values()} == {size}
    assert all(t.device.type == "cpu" for t in all_tensors(model).values())


# --- a conversion: written once, fingerprinted, reused --------------------------------------------

def test_dtype_mismatch_writes_a_fingerprinted_folder_once_and_reuses_it(tmp_path, bf16_file,
                                                                          eager, x):
    folder = tmp_path / "offload"
    first = load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                         offload_folder=folder)
    written = first.bigload_report.bytes_written
    n_disk = sum(1 for k in eager.state_dict() if k.startswith("layers."))
    assert written >= n_disk * 4  # fp32 bytes of the converted tensors (plus a header)
    assert first.bigload_report.offload_folder == str(folder.resolve())
    assert (folder / FINGERPRINT_FILE).is_file()
    marker = json.loads((folder / FINGERPRINT_FILE).read_text())
    assert marker["tensors"] == n_disk and len(marker["fingerprint"]) == 64
    assert first.layers[0].mlp[0].weight.dtype == torch.float32
    reference = eager_from_bf16(eager)
    assert torch.equal(first(x), reference(x))
    snapshot = tree(folder)

    second = load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                          offload_folder=folder)
    assert second.bigload_report.bytes_written == 0
    assert tree(folder) == snapshot
    assert torch.equal(second(x), reference(x))
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_conversion_without_an_offload_folder_is_refused_before_loading(bf16_file):
    model = skeleton()
    with pytest.raises(OffloadError, match="offload_folder") as info:
        load_checkpoint_and_dispatch(model, bf16_file, device_map=DISK_LAYERS)
    assert "'layers.0.attn.0.weight'" in str(info.value)
    assert all_meta(model)


def test_a_folder_holding_other_weights_is_refused_and_left_untouched(tmp_path, bf16_file):
    folder = tmp_path / "offload"
    load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                 offload_folder=folder)
    snapshot = tree(folder)
    other = skeleton(NestedBlocksModel, depth=2)  # another model: fewer, other tensors
    with pytest.raises(OffloadError, match=str(folder.resolve())):
        load_checkpoint_and_dispatch(other, bf16_file, device_map=DISK_LAYERS,
                                     offload_folder=folder, unexpected="ignore")
    assert tree(folder) == snapshot
    assert all_meta(other)


def test_the_same_model_at_another_dtype_is_refused(tmp_path, bf16_file):
    folder = tmp_path / "offload"
    load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                 offload_folder=folder)
    snapshot = tree(folder)
    model = skeleton()
    with pytest.raises(OffloadError, match="other weights"):
        load_checkpoint_and_dispatch(model, bf16_file, device_map=DISK_LAYERS,
                                     offload_folder=folder, dtype=torch.float16)
    assert tree(folder) == snapshot
    assert all_meta(model)


def test_a_folder_of_unknown_files_is_refused(tmp_path, bf16_file):
    folder = tmp_path / "offload"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OffloadError, match="did not write completely"):
        load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                     offload_folder=folder)
    assert tree(folder) == {"notes.txt": tree(folder)["notes.txt"]}
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_failed_conversion_leaves_nothing_that_looks_complete(tmp_path, bf16_file, eager, x,
                                                                  monkeypatch):
    real_write = folder_module.write_folder

    def failing_write(folder, items, fingerprint_value):
        calls = []

        def failing(item):
            def produce():
                calls.append(item.name)
                if len(calls) == 5:
                    raise OSError("No space left on device")
                return item.produce()

            return dataclasses.replace(item, produce=produce)

        return real_write(folder, [failing(i) for i in items], fingerprint_value)

    monkeypatch.setattr(folder_module, "write_folder", failing_write)
    folder = tmp_path / "offload"
    with pytest.raises(OSError, match="No space left"):
        load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                     offload_folder=folder)
    assert not (folder / FINGERPRINT_FILE).exists()
    assert not folder.exists() or not any(folder.iterdir())
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    monkeypatch.setattr(folder_module, "write_folder", real_write)  # the retry works
    model = load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                         offload_folder=folder)
    assert model.bigload_report.bytes_written > 0
    assert torch.equal(model(x), eager_from_bf16(eager)(x))


# --- disk_offload of an in-memory model ----------------------------------------------------------

def test_disk_offload_of_a_model_in_memory_round_trips(tmp_path, eager, x):
    model = copy.deepcopy(eager)
    expected = eager(x)
    disk_offload(model, tmp_path / "offload", execution_device="cpu")
    assert (tmp_path / "offload" / FINGERPRINT_FILE).is_file()
    assert torch.equal(model(x), expected)
    size = (tmp_path / "offload" / "offload.safetensors").stat().st_size
    assert {p.untyped_storage().nbytes() for p in model.parameters()} == {size}


def test_disk_offload_refuses_a_folder_of_another_models_weights(tmp_path, x):
    torch.manual_seed(0)
    first = NestedBlocksModel().eval()
    torch.manual_seed(1)
    second = NestedBlocksModel().eval()
    expected = second(x)
    disk_offload(first, tmp_path / "offload", execution_device="cpu")
    try:
        disk_offload(second, tmp_path / "offload", execution_device="cpu")
    except OffloadError:
        return  # refused: fine
    assert torch.equal(second(x), expected)  # or reused only if it really holds these weights


# --- prefetch and release ----------------------------------------------------------------------

CHAIN_MAP = {"a": "disk", "b": "disk", "c": "disk"}


@pytest.fixture
def chain_file(tmp_path) -> tuple[Path, ChainModel]:
    torch.manual_seed(0)
    eager = ChainModel().eval()
    path = tmp_path / "chain.safetensors"
    save_file(eager.state_dict(), path)
    return path, eager


@pytest.fixture
def spy(monkeypatch) -> list[tuple[str, list[str]]]:
    events: list[tuple[str, list[str]]] = []
    real_prefetch, real_release = OffloadStore.prefetch, OffloadStore.release

    def prefetch(self, fqns, **kwargs):
        fqns = list(fqns)
        events.append(("prefetch", fqns))
        return real_prefetch(self, fqns, **kwargs)

    def release(self, fqns):
        fqns = list(fqns)
        events.append(("release", fqns))
        return real_release(self, fqns)

    monkeypatch.setattr(OffloadStore, "prefetch", prefetch)
    monkeypatch.setattr(OffloadStore, "release", release)
    return events


def _unit(fqns: list[str]) -> str:
    units = {f.split(".")[0] for f in fqns}
    assert len(units) == 1, fqns
    return units.pop()


def _run_chain(chain_file, spy, **kwargs) -> None:
    path, eager = chain_file
    model = load_checkpoint_and_dispatch(skeleton(ChainModel), path, device_map=CHAIN_MAP, **kwargs)
    spy.clear()
    inputs = torch.randn(2, 8)
    assert torch.equal(model(inputs), eager(inputs))


def test_on_the_cpu_nothing_is_fetched_ahead_by_default_and_each_unit_is_released(
    chain_file, spy
):
    _run_chain(chain_file, spy)
    assert [kind for kind, _ in spy if kind == "prefetch"] == []
    releases = [_unit(f) for kind, f in spy if kind == "release"]
    assert releases == ["a", "b", "c"]
    assert all(len(f) == 2 for kind, f in spy if kind == "release")  # weight and bias


def test_running_a_unit_prefetches_the_next_one_and_releases_after(chain_file, spy):
    _run_chain(chain_file, spy, prefetch=1)
    first_release = spy.index(("release", ["a.weight", "a.bias"]))
    before_a_ends = [_unit(f) for kind, f in spy[:first_release] if kind == "prefetch"]
    assert before_a_ends == ["b"]  # unit a fetched b ahead
    second_release = next(i for i, (kind, f) in enumerate(spy)
                          if kind == "release" and _unit(f) == "b")
    during_b = [_unit(f) for kind, f in spy[first_release:second_release] if kind == "prefetch"]
    assert during_b == ["c"]


def test_prefetch_depth_two(chain_file, spy):
    _run_chain(chain_file, spy, prefetch=2)
    first_release = next(i for i, (kind, _) in enumerate(spy) if kind == "release")
    assert [_unit(f) for kind, f in spy[:first_release] if kind == "prefetch"] == ["b", "c"]


def test_prefetch_depth_one(chain_file, spy):
    _run_chain(chain_file, spy, prefetch=1)
    first_release = next(i for i, (kind, _) in enumerate(spy) if kind == "release")
    assert [_unit(f) for kind, f in spy[:first_release] if kind == "prefetch"] == ["b"]


def test_prefetch_zero_turns_it_off(chain_file, spy):
    _run_chain(chain_file, spy, prefetch=0)
    assert [kind for kind, _ in spy if kind == "prefetch"] == []
    assert [_unit(f) for kind, f in spy if kind == "release"] == ["a", "b", "c"]


def test_cpu_tier_units_are_neither_prefetched_nor_released(chain_file, spy):
    path, eager = chain_file
    model = load_checkpoint_and_dispatch(skeleton(ChainModel), path,
                                         device_map={"a": "cpu", "b": "disk", "c": "cpu"})
    spy.clear()
    inputs = torch.randn(2, 8)
    assert torch.equal(model(inputs), eager(inputs))
    assert {_unit(f) for _, f in spy} == {"b"}


# --- the store itself ----------------------------------------------------------------------------

def test_store_prefetch_wait_and_release_keep_values(tmp_path):
    torch.manual_seed(0)
    tensors = {"w": torch.randn(512, 512), "v": torch.randn(300)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    store = OffloadStore()
    reader = CheckpointReader(read_index(path))
    store.readers.append(reader)
    for item in stored_views(reader):
        store.add(item)
    assert set(store.items) == {"w", "v"}
    assert store.disk_bytes() == (512 * 512 + 300) * 4
    store.prefetch(["w", "v", "not-there"])
    store.wait(["w", "v", "not-there"])
    assert torch.equal(store.items["w"].tensor, tensors["w"])
    store.release(["w", "v"])
    assert torch.equal(store.items["w"].tensor, tensors["w"])  # pages read back from the file
    assert torch.equal(store.items["v"].tensor, tensors["v"])
    assert copy.deepcopy(store) is store  # shared: it holds maps of read-only files
    store.close()


def test_a_folder_converted_from_an_older_checkpoint_is_refused(tmp_path, bf16_file):
    folder = tmp_path / "offload"
    load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                 offload_folder=folder)
    snapshot = tree(folder)
    torch.manual_seed(42)  # the same names and shapes, new values: a retrained checkpoint
    save_file({k: v.bfloat16() for k, v in NestedBlocksModel().state_dict().items()}, bf16_file)
    model = skeleton()
    with pytest.raises(OffloadError, match="other weights"):
        load_checkpoint_and_dispatch(model, bf16_file, device_map=DISK_LAYERS,
                                     offload_folder=folder)
    assert tree(folder) == snapshot


def test_a_refused_folder_leaves_a_mixed_dtype_load_untouched(tmp_path, eager):
    path = tmp_path / "mixed.safetensors"
    save_file({k: v.bfloat16() if k.startswith("layers.1.") else v
               for k, v in eager.state_dict().items()}, path)  # layers.0/2 zero-copy, 1 converted
    folder = tmp_path / "offload"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    model = skeleton()
    with pytest.raises(OffloadError, match="did not write completely"):
        load_checkpoint_and_dispatch(model, path, device_map=DISK_LAYERS, offload_folder=folder)
    assert (folder / "notes.txt").read_text() == "mine"
    assert all_meta(model)
