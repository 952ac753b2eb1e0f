"""The plan is the one hand-off: every way of saying where tensors go becomes a DevicePlan once,
and the stages (verify, load, dispatch) are peers that receive it. Plus the bugs found on the way
(ties across repeated blocks, offload_buffers, emptying a tensor under other references)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import bigload
from bigload import (
    disk_offload,
    infer_auto_device_map,
    init_empty_weights,
    plan_devices,
    plan_from_device_map,
    set_module_tensor_to_device,
)
from bigload.errors import DeviceMapError
from bigload.plan import DevicePlan
from conftest import BatchNormModel, NestedBlocksModel


def skeleton(cls=NestedBlocksModel, **kwargs) -> nn.Module:
    with init_empty_weights():
        return cls(**kwargs)


# --- the stages as peers ----------------------------------------------------------------------
def test_the_five_stages_compose_by_hand(tmp_path):
    torch.manual_seed(0)
    eager = NestedBlocksModel().eval()
    save_file(eager.state_dict(), tmp_path / "model.safetensors")
    model = skeleton()
    index = bigload.read_index(tmp_path)
    plan = plan_from_device_map(model, {"embed": "cpu", "layers": "disk", "norm": "cpu"})
    report = bigload.verify(model, index, plan=plan)
    loaded = bigload.load_weights(model, index, plan, verified=report)
    bigload.dispatch(model, plan, loaded.store)
    assert model.bigload_plan is plan
    assert loaded.report.zero_copy == sum(1 for n in eager.state_dict() if n.startswith("layers"))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))


@pytest.mark.parametrize("device_map", ["cpu", torch.device("cpu"), {"": "cpu"},
                                        {"embed": "cpu", "layers": "disk", "norm": "cpu"}])
def test_every_way_of_saying_where_becomes_a_plan(tmp_path, device_map):
    torch.manual_seed(0)
    eager = NestedBlocksModel().eval()
    save_file(eager.state_dict(), tmp_path / "model.safetensors")
    model = bigload.load_checkpoint_and_dispatch(skeleton(), tmp_path, device_map=device_map)
    assert isinstance(model.bigload_plan, DevicePlan)
    assert model.bigload_plan.main_device == "cpu"
    assert DevicePlan.from_json(model.bigload_plan.to_json()) == model.bigload_plan


def test_a_plan_for_another_model_is_refused_before_anything_moves(tmp_path):
    torch.manual_seed(0)
    save_file(NestedBlocksModel().state_dict(), tmp_path / "model.safetensors")
    other = plan_from_device_map(skeleton(NestedBlocksModel, depth=1),
                                 {"embed": "cpu", "layers.0": "cpu", "norm": "cpu"})
    model = skeleton()
    with pytest.raises(DeviceMapError):
        bigload.load_checkpoint_and_dispatch(model, tmp_path, device_map=other)
    assert all(p.is_meta for p in model.parameters())


def test_the_main_device_and_prefetch_are_decided_once_by_the_plan():
    plan = plan_from_device_map(skeleton(), {"embed": 0, "layers": "cpu", "norm": "disk"},
                                check_available=False)
    assert plan.main_device == "cuda:0" and plan.prefetch == 1  # one unit read ahead
    assert plan_from_device_map(skeleton(), {"": "disk"}).prefetch == 1  # on the CPU too
    assert plan_from_device_map(skeleton(), "disk", prefetch=3).prefetch == 3
    with pytest.raises(DeviceMapError, match="prefetch"):
        plan_from_device_map(skeleton(), "cpu", prefetch=-1)


# --- bugs found on the way ----------------------------------------------------------------------
class TiedAcrossBlocks(nn.Module):
    """One weight shared by the last Linear of three repeated blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
                                      for _ in range(4)])
        self.blocks[1][2].weight = self.blocks[0][2].weight
        self.blocks[2][2].weight = self.blocks[0][2].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_a_weight_tied_across_blocks_does_not_glue_the_blocks_together(tmp_path):
    # each block is 336 bytes (the tied weight 144 of them): a CPU of 700 bytes holds some
    # blocks; gluing every block that holds the tie into one unit sent the whole model to disk
    plan = plan_devices(skeleton(TiedAcrossBlocks), max_memory={"cpu": 700, "disk": "1GB"},
                        prefetch=0)
    assert plan.bytes_per_device.get("cpu", 0) > 0
    accelerate_map = infer_auto_device_map(skeleton(TiedAcrossBlocks), max_memory={"cpu": 700})
    assert set(accelerate_map.values()) == {"cpu", "disk"}
    torch.manual_seed(0)
    eager = TiedAcrossBlocks().eval()
    save_file({k: v for k, v in eager.state_dict().items()
               if k not in ("blocks.1.2.weight", "blocks.2.2.weight")}, tmp_path / "m.safetensors")
    model = bigload.load_checkpoint_and_dispatch(skeleton(TiedAcrossBlocks), tmp_path,
                                                 device_map=plan)
    assert model.blocks[1][2].weight is model.blocks[0][2].weight
    x = torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))


def test_disk_offload_keeps_buffers_in_memory_unless_told(tmp_path):
    torch.manual_seed(0)
    model = BatchNormModel().train()
    twin = copy.deepcopy(model)
    disk_offload(model, tmp_path / "offload", offload_buffers=False)
    assert model.bn.running_mean.data_ptr() != 0
    x = torch.randn(8, 6)
    for _ in range(2):  # training-mode BatchNorm updates its statistics in place each forward
        torch.testing.assert_close(model(x), twin(x))
    assert int(model.bn.num_batches_tracked) == 2
    torch.testing.assert_close(model.bn.running_mean, twin.bn.running_mean)


def test_emptying_a_tensor_keeps_other_references_data():
    lin = nn.Linear(3, 3)
    stash = lin.weight.to("cpu")  # the very same tensor object (already on the CPU)
    before = stash.detach().clone()
    set_module_tensor_to_device(lin, "weight", "meta")
    assert lin.weight.is_meta
    assert not stash.is_meta and torch.equal(stash, before)


def test_a_loaded_model_saves_each_tensor_once(tmp_path):
    import io

    from safetensors.torch import load_file, save_model

    torch.manual_seed(0)
    eager = NestedBlocksModel(n=32).eval()
    save_file(eager.state_dict(), tmp_path / "model.safetensors")
    model = bigload.load_checkpoint_and_dispatch(
        skeleton(NestedBlocksModel, n=32), tmp_path,
        device_map={"embed": "cpu", "layers": "disk", "norm": "cpu"})
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    tensor_bytes = sum(t.numel() * t.element_size() for t in eager.state_dict().values())
    assert len(buffer.getvalue()) < 1.2 * tensor_bytes  # not the mapped file once per tensor
    save_model(model, tmp_path / "again.safetensors")  # refuses tensors sharing a storage
    again = load_file(tmp_path / "again.safetensors")
    for name, value in eager.state_dict().items():
        assert torch.equal(again[name], value), name
