"""dispatch_model onto one device: materialize semantics, never "Cannot copy out of meta tensor"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bigload import dispatch_model, init_empty_weights, set_module_tensor_to_device
from bigload.devices import accelerator_type
from bigload.errors import DeviceError, DeviceMapError, MetaTensorError, SkeletonError
from conftest import (
    BatchNormModel,
    NestedBlocksModel,
    RotaryModel,
    TiedModel,
    all_tensors,
    devices_of,
)

CPU_MAPS = [
    pytest.param({"": "cpu"}, id="map-str"),
    pytest.param({"": torch.device("cpu")}, id="map-device"),
    pytest.param("cpu", id="str"),
    pytest.param(torch.device("cpu"), id="device"),
]


def skeleton(cls: type[nn.Module], **kwargs) -> nn.Module:
    with init_empty_weights():
        return cls(**kwargs)


@pytest.mark.parametrize("device_map", CPU_MAPS)
def test_real_model_onto_cpu_runs_unchanged(device_map, nested_blocks_model):
    x = torch.randn(3, 8)
    expected = nested_blocks_model(x)
    params = {name: p for name, p in nested_blocks_model.named_parameters()}
    assert dispatch_model(nested_blocks_model, device_map) is nested_blocks_model
    assert devices_of(nested_blocks_model) == {"cpu"}
    torch.testing.assert_close(nested_blocks_model(x), expected, rtol=0, atol=0)
    assert all(p is params[name] for name, p in nested_blocks_model.named_parameters())


@pytest.mark.parametrize("device_map", CPU_MAPS)
def test_meta_model_raises_listing_tensors_not_cannot_copy(device_map):
    model = skeleton(BatchNormModel)
    with pytest.raises(MetaTensorError) as info:
        dispatch_model(model, device_map)
    message = str(info.value)
    for name in ("fc.weight", "fc.bias", "bn.weight", "bn.bias"):
        assert f"'{name}'" in message
    assert "Cannot copy out of meta" not in message
    assert {p.device.type for p in model.parameters()} == {"meta"}  # untouched


def test_partly_loaded_model_lists_only_what_is_still_meta(nested_blocks_model):
    model = skeleton(NestedBlocksModel)
    state = nested_blocks_model.state_dict()
    for name in state:
        if name != "layers.1.mlp.2.bias":
            set_module_tensor_to_device(model, name, "cpu", value=state[name])
    with pytest.raises(MetaTensorError, match=r"'layers\.1\.mlp\.2\.bias'") as info:
        dispatch_model(model, {"": "cpu"})
    assert str(info.value).startswith("1 tensor(s)")
    assert model.layers[1].mlp[2].bias.is_meta


def test_fully_loaded_skeleton_dispatches_and_matches_eager(nested_blocks_model):
    model = skeleton(NestedBlocksModel)
    for name, value in nested_blocks_model.state_dict().items():
        set_module_tensor_to_device(model, name, "cpu", value=value)
    dispatch_model(model, {"": "cpu"})
    x = torch.randn(2, 8)
    torch.testing.assert_close(model(x), nested_blocks_model(x))


def test_non_persistent_meta_buffer_is_a_skeleton_error():
    with torch.device("meta"):
        model = RotaryModel()
    with pytest.raises(SkeletonError, match="'inv_freq'"):
        dispatch_model(model, {"": "cpu"})


def test_ties_survive_dispatch(tied_model):
    dispatch_model(tied_model, {"": "cpu"})
    assert tied_model.head.weight is tied_model.embed.weight
    assert len(all_tensors(tied_model)) == 2


@pytest.mark.skipif(accelerator_type() is not None, reason="needs a machine without accelerator")
@pytest.mark.parametrize("device_map", [0, {"": 0}, "cuda:0", {"": "cuda"}])
def test_unavailable_device_is_a_clear_error(device_map, tied_model):
    # dispatch may report it as a bad device map (DeviceMapError) wrapping the DeviceError text
    with pytest.raises((DeviceError, DeviceMapError), match="no cuda device is available"):
        dispatch_model(tied_model, device_map)
    assert devices_of(tied_model) == {"cpu"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device_map", [0, {"": 0}, "cuda:0", torch.device("cuda", 0)])
def test_real_model_onto_gpu(device_map, nested_blocks_model, tied_model):
    x = torch.randn(3, 8)
    expected = nested_blocks_model(x)
    dispatch_model(nested_blocks_model, device_map)
    assert devices_of(nested_blocks_model) == {"cuda"}
    torch.testing.assert_close(nested_blocks_model(x.cuda()).cpu(), expected)
    dispatch_model(tied_model, device_map)
    assert tied_model.head.weight is tied_model.embed.weight
    assert tied_model.embed.weight.device == torch.device("cuda", 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_meta_model_onto_gpu_raises_listing_tensors():
    model = skeleton(TiedModel)
    with pytest.raises(MetaTensorError, match="'embed.weight'"):
        dispatch_model(model, {"": 0})
    assert model.embed.weight.is_meta
