"""Bigger than RAM: the CPU tier is resident memory of its own, the disk tier streams through a
small reused pool without leaving pages behind, units too big for the room stream in pieces, and
the planner uses the whole budget."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import bigload.offload.stream as stream_module
import bigload.runtime.attach as attach_module
from bigload import init_empty_weights, load_checkpoint_and_dispatch, plan_devices
from bigload.errors import DoesNotFitError
from bigload.runtime import state_of
from conftest import NestedBlocksModel

MIXED = {"embed": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "disk", "norm": "cpu"}


def skeleton(cls=NestedBlocksModel, **kwargs) -> nn.Module:
    with init_empty_weights():
        return cls(**kwargs)


@pytest.fixture
def eager() -> NestedBlocksModel:
    torch.manual_seed(0)
    return NestedBlocksModel(n=64).eval()


@pytest.fixture
def ckpt(tmp_path, eager) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), path)
    return path


def file_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from ``path`` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


def inside(ptr: int, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= ptr < end for start, end in ranges)


def cached_pages(path: Path, start: int, end: int) -> int:
    """Pages of ``path``'s byte range [start, end) in the page cache (mincore)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    first = (start // mmap.PAGESIZE) * mmap.PAGESIZE
    vec = (ctypes.c_ubyte * (-(-(end - first) // mmap.PAGESIZE)))()
    assert libc.mincore(ctypes.c_void_p(base + first), ctypes.c_size_t(end - first), vec) == 0
    resident = sum(v & 1 for v in vec)
    del vec
    return resident


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def where_weights_run(model: nn.Module, ranges: list[tuple[int, int]]) -> list[bool]:
    """Per forward of ``layers.1.mlp.0`` (a disk unit), whether its weight was the file's own
    pages; the hook runs after bigload's, which paged it in."""
    seen: list[bool] = []
    model.layers[1].mlp[0].register_forward_pre_hook(
        lambda m, i: seen.append(inside(m.weight.data_ptr(), ranges)))
    return seen


def byte_span(state, prefix: str) -> tuple[int, int]:
    """The checkpoint bytes of the stored tensors whose names start with ``prefix``."""
    items = [state.store.items[n] for n in state.store.items if n.startswith(prefix)]
    return min(i.byte_range[0] for i in items), max(i.byte_range[1] for i in items)


# --- the CPU tier is resident ------------------------------------------------------------------
def test_cpu_tier_is_memory_of_its_own_and_disk_tier_views_the_file(ckpt, eager):
    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=MIXED)
    ranges = file_ranges(ckpt)
    assert ranges  # the disk tier maps the checkpoint
    for name, p in model.named_parameters():
        on_disk = name.startswith(("layers.1.", "layers.2."))
        assert inside(p.data_ptr(), ranges) == on_disk, name
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))


# --- the disk tier streams -----------------------------------------------------------------------
@pytest.fixture
def tight_memory(monkeypatch):
    """This process may take little more memory (as in a small container): the page cache
    cannot hold the disk tier."""
    monkeypatch.setattr(attach_module, "cache_can_hold", lambda nbytes: False)


def test_disk_units_stream_through_the_pool_and_leave_no_pages_behind(ckpt, eager, tight_memory):
    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=MIXED, prefetch=1)
    ranges = file_ranges(ckpt)
    seen = where_weights_run(model, ranges)
    drop_cache(ckpt)
    x = torch.randn(4, 64)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), eager(x))
    assert seen == [False] * 3  # in the forward: a pool buffer, not the file's pages
    assert inside(model.layers[1].mlp[0].weight.data_ptr(), ranges)  # after: the view again
    state = state_of(model)
    state.streamer.settle()  # the next forward's first unit is being read ahead
    start, end = byte_span(state, "layers.")
    assert cached_pages(ckpt, start, end) == 0  # read, used, and gone from the page cache
    assert state.streamer.slots == 2  # 1 + prefetch buffers of the largest disk unit
    largest = max(sum(state.store.items[s.fqn].nbytes for s in u.slots)
                  for u in state.units if u.streams)
    assert largest <= state.streamer.buffer_bytes < largest + 3 * 4096  # page-aligned reads


def test_the_next_disk_unit_is_read_ahead(ckpt, eager, monkeypatch, tight_memory):
    started = []
    real = stream_module.Streamer.start
    monkeypatch.setattr(stream_module.Streamer, "start",
                        lambda self, key, items: (started.append(key), real(self, key, items)))
    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=MIXED, prefetch=1)
    with torch.no_grad():
        model(torch.randn(2, 64))
    streamed = [u.name for u in state_of(model).units if u.streams]
    assert len(streamed) > 2
    # each streamed unit, when it starts, has the next one read (the last one: the first, for
    # the next forward)
    assert started == streamed[1:] + streamed[:1]


@pytest.mark.parametrize("memory", ["tight", "plentiful"])
def test_under_autograd_the_disk_tier_gives_the_same_gradients(ckpt, eager, memory, request):
    if memory == "tight":
        request.getfixturevalue("tight_memory")
    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=MIXED)
    x = torch.randn(4, 64)
    model(x).sum().backward()
    eager(x).sum().backward()
    for (name, got), want in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got.grad, want.grad, msg=name)


def test_an_exception_in_a_streamed_unit_puts_every_weight_back(ckpt, eager, tight_memory):
    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=MIXED)
    ranges = file_ranges(ckpt)
    with torch.no_grad(), pytest.raises(RuntimeError):
        model(torch.randn(4, 63))  # wrong width: the first streamed unit's matmul fails
    state = state_of(model)
    assert not state.swapped and not state.streaming
    assert inside(model.layers[1].mlp[0].weight.data_ptr(), ranges)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))


# --- units bigger than the room ------------------------------------------------------------------
def test_a_unit_bigger_than_the_room_streams_in_pieces(ckpt, eager):
    block = sum(p.numel() * 4 for p in eager.layers[0].parameters())
    piece = eager.layers[0].mlp[0].weight.numel() * 4 + 2 * 64 * 4
    budget = block // 2  # no block fits the room; its largest module does
    assert piece < budget
    plan = plan_devices(skeleton(n=64), max_memory={"cpu": budget, "disk": "1GB"}, prefetch=0)
    assert any("layers.0.mlp.0" == u.name for u in plan.units)
    assert any("streamed in pieces" in note for note in plan.notes)
    assert plan.bytes_per_device.get("cpu", 0) + plan.reserve_bytes <= budget
    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=plan)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))


def test_refused_only_when_a_single_module_does_not_fit(ckpt):
    with pytest.raises(DoesNotFitError, match="layers.0.mlp.0"):
        plan_devices(skeleton(n=64), max_memory={"cpu": 1000, "disk": "1GB"})


@pytest.mark.parametrize("family", ["albert", "convnext"])
def test_transformers_models_run_under_a_budget_smaller_than_their_largest_block(
    tmp_path, family
):
    transformers = pytest.importorskip("transformers")
    import bigload

    torch.manual_seed(0)
    if family == "albert":
        config = transformers.AlbertConfig(
            vocab_size=100, embedding_size=16, hidden_size=64, num_hidden_layers=4,
            num_attention_heads=4, intermediate_size=128)
        eager = transformers.AlbertModel(config).eval()
        block = eager.encoder.albert_layer_groups[0]
        inputs = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]])}
    else:
        config = transformers.ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], image_size=32)
        eager = transformers.ConvNextModel(config).eval()
        block = max(eager.encoder.stages, key=lambda s: sum(p.numel() for p in s.parameters()))
        inputs = {"pixel_values": torch.randn(1, 3, 32, 32)}
    eager.save_pretrained(tmp_path)
    largest = sum(p.numel() * 4 for p in block.parameters())
    model = bigload.load(tmp_path, max_memory={"cpu": int(largest * 0.7), "disk": "1GB"})
    assert "disk" in model.bigload_plan.bytes_per_device
    with torch.no_grad():
        got, want = model(**inputs), eager(**inputs)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)


# --- the whole budget is used --------------------------------------------------------------------
class FourLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.units = nn.ModuleList(nn.Linear(1, 1, bias=False) for _ in range(4))


def test_room_left_after_the_in_order_pass_is_filled():
    # sizes 8, 40, 8, 4 bytes on a 46-byte CPU: the 40-byte unit runs from disk, so the CPU
    # keeps 40 bytes for it and 6 are left: in order, unit 0 (8) does not fit and everything
    # after it went to disk; unit 3 (4) fits the room and is filled back
    sizes = {f"units.{i}.weight": size for i, size in enumerate((8, 40, 8, 4))}
    plan = plan_devices(skeleton(FourLinears), max_memory={"cpu": 46, "disk": "1GB"},
                        tensor_sizes=sizes, no_split_module_classes=[], prefetch=0)
    placements = {u.name: u.placement for u in plan.units}
    assert placements == {"units.0": "disk", "units.1": "disk", "units.2": "disk",
                          "units.3": "cpu"}
    assert "filled back from disk" in plan.units[3].reason
    assert plan.bytes_per_device["cpu"] + plan.reserve_bytes <= 46


def test_a_checkpoint_replaced_after_the_load_is_not_streamed(ckpt, eager, tight_memory):
    from bigload.errors import CheckpointChangedError

    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=MIXED)
    torch.manual_seed(1)
    replaced = ckpt.with_suffix(".new")
    save_file(NestedBlocksModel(n=64).state_dict(), replaced)
    os.replace(replaced, ckpt)  # a re-download or a save_pretrained into the same folder
    with torch.no_grad(), pytest.raises(CheckpointChangedError, match=str(ckpt.name)):
        model(torch.randn(2, 64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_disk_units_stream_through_a_pinned_pool_onto_the_gpu(ckpt, eager, tight_memory):
    gpu_map = {"embed": 0, "layers.0": "cpu", "layers.1": "disk", "layers.2": "disk", "norm": 0}
    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=gpu_map, prefetch=1)
    state = state_of(model)
    assert state.streamer is not None and state.streamer.pin
    x = torch.randn(4, 64)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(model(x.cuda()).cpu(), eager(x))
    assert not state.swapped and not state.streaming
    assert model.layers[1].mlp[0].weight.device.type == "cpu"  # back on its file view


def test_a_deep_read_ahead_never_starves_the_readers(ckpt, eager, tight_memory):
    # more units read ahead than reader threads: each fill waits on its reads, in another pool
    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=MIXED, prefetch=6)
    x = torch.randn(4, 64)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), eager(x))


def test_where_memory_is_plentiful_disk_units_run_on_their_file_views(ckpt, eager, monkeypatch):
    taken = []
    real = stream_module.Streamer.take
    monkeypatch.setattr(stream_module.Streamer, "take", lambda *a: taken.append(a) or real(*a))
    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=MIXED, prefetch=1)
    state = state_of(model)
    assert state.streamer is None  # this machine has far more free memory than the disk tier
    ranges = file_ranges(ckpt)
    seen = where_weights_run(model, ranges)
    drop_cache(ckpt)
    x = torch.randn(2, 64)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), eager(x))
    assert seen == [True, True] and not taken  # no copy: the file's own pages
    start, end = byte_span(state, "layers.1.")
    assert cached_pages(ckpt, start, end) > 0  # the page cache keeps them for the next token


def test_a_checkpoint_renamed_over_keeps_serving_what_was_loaded(ckpt, eager):
    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=MIXED)
    torch.manual_seed(1)
    replaced = ckpt.with_suffix(".new")
    save_file(NestedBlocksModel(n=64).state_dict(), replaced)
    os.replace(replaced, ckpt)  # the mapping holds the file that was loaded
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))


def test_a_checkpoint_rewritten_in_place_is_refused_not_faulted(ckpt, eager):
    from bigload.errors import CheckpointChangedError

    model = load_checkpoint_and_dispatch(skeleton(n=64), ckpt, device_map=MIXED)
    with open(ckpt, "r+b") as f:  # truncated: touching its mapped pages would raise SIGBUS
        f.truncate(1024)
    with torch.no_grad(), pytest.raises(CheckpointChangedError, match=str(ckpt.name)):
        model(torch.randn(2, 64))
