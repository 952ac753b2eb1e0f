"""Offloaded weights: disk tensors served from the checkpoint's own safetensors files (nothing
written); conversions written once into packs of the offload folder and reused by every later
load that needs them, other files left alone; pages fetched ahead / released after use.
Faults and concurrency of offload folders: test_offload_folder.py."""

from __future__ import annotations

import copy
import hashlib
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import bigload.offload.folder as folder_module
from bigload import disk_offload, init_empty_weights, load_checkpoint_and_dispatch
from bigload.checkpoint import CheckpointReader, read_index
from bigload.errors import OffloadError
from bigload.offload import MANIFEST_FILE, OffloadStore, stored_views
from bigload.offload.packs import read_pack
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


def packs(folder: Path) -> list[Path]:
    return sorted(folder.glob("bigload-pack-*.pack")) if folder.exists() else []


def snapshot_of_packs(snapshot: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {n: v for n, v in snapshot.items() if n.startswith("bigload-pack-")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    mapped = [tuple(int(x, 16) for x in line.split()[0].split("-"))
              for line in Path("/proc/self/maps").read_text().splitlines()
              if line.endswith(str(fp32_file.resolve()))]
    for tensor in all_tensors(model).values():
        assert tensor.device.type == "cpu"
        assert any(start <= tensor.data_ptr() < end for start, end in mapped)  # the file's pages
        # a storage of its own bytes: saving the model writes each tensor once, not the file
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


# --- a conversion: written once into a pack, reused ---------------------------------------------

def test_dtype_mismatch_converts_once_into_a_pack_and_reuses_it(tmp_path, bf16_file, eager, x):
    folder = tmp_path / "offload"
    first = load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                         offload_folder=folder)
    written = first.bigload_report.bytes_written
    n_disk = sum(1 for k in eager.state_dict() if k.startswith("layers."))
    assert written >= n_disk * 4  # fp32 bytes of the converted tensors (plus a header)
    assert first.bigload_report.offload_folder == str(folder.resolve())
    [pack] = packs(folder)
    assert pack.stat().st_size == written
    assert len(read_pack(pack).index.entries) == n_disk
    assert first.layers[0].mlp[0].weight.dtype == torch.float32
    reference = eager_from_bf16(eager)
    assert torch.equal(first(x), reference(x))
    snapshot = tree(folder)

    second = load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                          offload_folder=folder)
    assert second.bigload_report.bytes_written == 0
    assert packs(folder) == [pack] and tree(folder)[pack.name] == snapshot[pack.name]
    assert torch.equal(second(x), reference(x))
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_conversion_without_an_offload_folder_is_refused_before_loading(bf16_file):
    model = skeleton()
    with pytest.raises(OffloadError, match="offload_folder") as info:
        load_checkpoint_and_dispatch(model, bf16_file, device_map=DISK_LAYERS)
    assert "'layers.0.attn.0.weight'" in str(info.value)
    assert all_meta(model)


def test_another_model_of_the_same_checkpoint_reuses_the_tensors_it_shares(tmp_path, bf16_file,
                                                                           eager, x):
    folder = tmp_path / "offload"
    load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                 offload_folder=folder)
    snapshot = tree(folder)
    other = load_checkpoint_and_dispatch(skeleton(NestedBlocksModel, depth=2), bf16_file,
                                         device_map=DISK_LAYERS, offload_folder=folder,
                                         unexpected="ignore")
    assert other.bigload_report.bytes_written == 0  # layers 0 and 1 are already there
    assert snapshot_of_packs(tree(folder)) == snapshot_of_packs(snapshot)
    reference = NestedBlocksModel(depth=2).eval()
    reference.load_state_dict({k: v for k, v in eager_from_bf16(eager).state_dict().items()
                               if not k.startswith("layers.2.")})
    assert torch.equal(other(x), reference(x))


def test_another_dtype_adds_a_pack_and_leaves_the_first_unchanged(tmp_path, bf16_file, eager, x):
    folder = tmp_path / "offload"
    first = load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                         offload_folder=folder)
    [pack] = packs(folder)
    digest = sha256(pack)
    half = load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                        offload_folder=folder, dtype=torch.float16)
    assert half.bigload_report.bytes_written > 0
    assert len(packs(folder)) == 2 and sha256(pack) == digest
    assert half.layers[0].mlp[0].weight.dtype == torch.float16
    reference = eager_from_bf16(eager)
    assert torch.equal(first(x), reference(x))
    expected = reference.half()(x.half())
    assert torch.equal(half(x.half()), expected)


def test_unrelated_files_in_the_folder_are_never_read_changed_or_removed(tmp_path, bf16_file,
                                                                          eager, x):
    folder = tmp_path / "offload"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.bin").write_bytes(b"\0" * 10)
    (folder / "other.safetensors").write_bytes(b"not a checkpoint")
    (folder / ".bigload-pack-mine.tmp").write_text("not bigload's naming")
    before = tree(folder)
    model = load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                         offload_folder=folder)
    assert torch.equal(model(x), eager_from_bf16(eager)(x))
    after = tree(folder)
    assert {k: after[k] for k in before} == before
    assert (folder / "notes.txt").read_text() == "mine"


def test_the_checkpoints_own_folder_can_be_its_offload_folder(tmp_path, eager, x):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(eager.state_dict(), folder / "pt_model.bin")  # as accelerate's tests do
    (folder / "config.json").write_text("{}")
    model = load_checkpoint_and_dispatch(skeleton(), folder / "pt_model.bin",
                                         device_map=DISK_LAYERS, offload_folder=folder)
    assert model.bigload_report.bytes_written > 0 and len(packs(folder)) == 1
    assert torch.equal(model(x), eager(x))
    assert read_index(folder).files == (folder.resolve() / "pt_model.bin",)  # packs are not weights
    again = load_checkpoint_and_dispatch(skeleton(), folder, device_map=DISK_LAYERS,
                                         offload_folder=folder)
    assert again.bigload_report.bytes_written == 0
    assert torch.equal(again(x), eager(x))


def test_packs_in_a_folder_of_loose_safetensors_files_are_not_read_as_weights(tmp_path, eager):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({k: v.bfloat16() for k, v in eager.state_dict().items()}, folder / "w.safetensors")
    load_checkpoint_and_dispatch(skeleton(), folder, device_map=DISK_LAYERS,
                                 offload_folder=folder)
    assert packs(folder)
    assert read_index(folder).files == (folder.resolve() / "w.safetensors",)


def test_a_failed_conversion_leaves_no_pack_and_the_model_untouched(tmp_path, bf16_file, eager,
                                                                     x, monkeypatch):
    real_produce = folder_module._produce
    calls = []

    def failing(item, digests):
        calls.append(item.name)
        if len(calls) == 5:
            raise RuntimeError("the source could not be read")
        return real_produce(item, digests)

    monkeypatch.setattr(folder_module, "_produce", failing)
    folder = tmp_path / "offload"
    model = skeleton()
    with pytest.raises(RuntimeError, match="could not be read"):
        load_checkpoint_and_dispatch(model, bf16_file, device_map=DISK_LAYERS,
                                     offload_folder=folder)
    assert all_meta(model)
    assert not packs(folder)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(folder_module, "_produce", real_produce)  # the retry works
    model = load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                         offload_folder=folder)
    assert model.bigload_report.bytes_written > 0
    assert torch.equal(model(x), eager_from_bf16(eager)(x))


# --- disk_offload of an in-memory model ----------------------------------------------------------

def test_disk_offload_of_a_model_in_memory_round_trips(tmp_path, eager, x):
    model = copy.deepcopy(eager)
    expected = eager(x)
    disk_offload(model, tmp_path / "offload", execution_device="cpu")
    assert torch.equal(model(x), expected)
    [pack] = packs(tmp_path / "offload")
    mapped = [tuple(int(x, 16) for x in line.split()[0].split("-"))
              for line in Path("/proc/self/maps").read_text().splitlines()
              if line.endswith(str(pack.resolve()))]
    for p in model.parameters():  # views of the pack, each through a storage of its own bytes
        assert any(start <= p.data_ptr() < end for start, end in mapped)
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()


def test_disk_offload_of_other_weights_adds_a_pack_and_of_the_same_reuses(tmp_path, x):
    torch.manual_seed(0)
    first = NestedBlocksModel().eval()
    torch.manual_seed(1)
    second = NestedBlocksModel().eval()
    copied = copy.deepcopy(first)
    expected_first, expected_second = first(x), second(x)
    folder = tmp_path / "offload"
    disk_offload(first, folder, execution_device="cpu")
    [pack] = packs(folder)
    digest = sha256(pack)
    disk_offload(second, folder, execution_device="cpu")
    assert len(packs(folder)) == 2 and sha256(pack) == digest
    assert torch.equal(first(x), expected_first)
    assert torch.equal(second(x), expected_second)
    disk_offload(copied, folder, execution_device="cpu")  # the same values: nothing new
    assert len(packs(folder)) == 2
    assert torch.equal(copied(x), expected_first)


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


def test_by_default_one_unit_is_fetched_ahead_and_each_unit_is_released(chain_file, spy):
    _run_chain(chain_file, spy)
    by_default = list(spy)
    assert [_unit(f) for kind, f in by_default if kind == "prefetch"] == ["b", "c", "a"]
    releases = [_unit(f) for kind, f in by_default if kind == "release"]
    assert releases == ["a", "b", "c"]
    assert all(len(f) == 2 for kind, f in by_default if kind == "release")  # weight and bias
    _run_chain(chain_file, spy, prefetch=1)
    assert spy == by_default


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


def test_a_retrained_checkpoint_adds_a_pack_with_its_new_values(tmp_path, bf16_file, x):
    folder = tmp_path / "offload"
    load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                 offload_folder=folder)
    [pack] = packs(folder)
    digest = sha256(pack)
    torch.manual_seed(42)  # the same names and shapes, new values: a retrained checkpoint
    retrained = NestedBlocksModel().eval()
    save_file({k: v.bfloat16() for k, v in retrained.state_dict().items()}, bf16_file)
    model = load_checkpoint_and_dispatch(skeleton(), bf16_file, device_map=DISK_LAYERS,
                                         offload_folder=folder)
    assert model.bigload_report.bytes_written > 0
    assert len(packs(folder)) == 2 and sha256(pack) == digest
    assert torch.equal(model(x), eager_from_bf16(retrained)(x))


def test_a_refused_folder_leaves_a_mixed_dtype_load_untouched(tmp_path, eager):
    path = tmp_path / "mixed.safetensors"
    save_file({k: v.bfloat16() if k.startswith("layers.1.") else v
               for k, v in eager.state_dict().items()}, path)  # layers.0/2 zero-copy, 1 converted
    folder = tmp_path / "offload"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text("[1, 2]")  # not a manifest bigload wrote
    model = skeleton()
    with pytest.raises(OffloadError, match="not a manifest bigload wrote"):
        load_checkpoint_and_dispatch(model, path, device_map=DISK_LAYERS, offload_folder=folder)
    assert (folder / MANIFEST_FILE).read_text() == "[1, 2]"
    assert all_meta(model)
    assert not packs(folder)


# --- forwards from several threads ---------------------------------------------------------------

@pytest.mark.parametrize("prefetch", [0, 1])
def test_forwards_of_a_cpu_and_disk_model_from_four_threads_equal_single_threaded(tmp_path,
                                                                                  prefetch):
    torch.manual_seed(0)
    eager = NestedBlocksModel(n=64, depth=6).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.bfloat16() if k.startswith("layers.4.") else v  # one unit from a pack
               for k, v in eager.state_dict().items()}, path)
    eager.layers[4].load_state_dict({k: v.bfloat16().float()
                                     for k, v in eager.layers[4].state_dict().items()})
    device_map = {"embed": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "cpu",
                  "layers.3": "disk", "layers.4": "disk", "layers.5": "cpu", "norm": "disk"}
    model = load_checkpoint_and_dispatch(skeleton(NestedBlocksModel, n=64, depth=6), path,
                                         device_map=device_map, offload_folder=tmp_path / "off",
                                         prefetch=prefetch)
    assert model.bigload_report.bytes_written > 0 and model.bigload_report.zero_copy > 0
    inputs = [torch.randn(5, 64, generator=torch.Generator().manual_seed(i)) for i in range(50)]
    with torch.no_grad():
        expected = [eager(i) for i in inputs]
    problems: list[str] = []

    def run(thread: int) -> None:
        try:
            with torch.no_grad():
                for i, value in enumerate(inputs):
                    if not torch.equal(model(value), expected[i]):
                        problems.append(f"thread {thread}, input {i}: another result")
        except Exception as err:  # noqa: BLE001 - reported below with its thread
            problems.append(f"thread {thread}: {err!r}")

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
