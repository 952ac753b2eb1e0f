"""Materialisation: set_module_tensor_to_device and materialize, never uninitialised memory."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch import nn

from bigload import init_empty_weights, materialize, set_module_tensor_to_device
from bigload.devices import accelerator_type
from bigload.errors import (
    DeviceError,
    DtypeError,
    MetaTensorError,
    NoInitError,
    ShapeMismatchError,
    SkeletonError,
    UnknownTensorError,
)
from conftest import (
    SEED,
    BatchNormModel,
    IntBufferModel,
    MixedBuffersModel,
    NestedBlocksModel,
    NoResetModule,
    RotaryModel,
    SharedParameterModel,
    SharedSubmoduleModel,
    TaggedFrozenModel,
    TaggedParameter,
    TiedModel,
    all_tensors,
    devices_of,
)

NO_ACCELERATOR = pytest.mark.skipif(
    accelerator_type() is not None, reason="checks the errors of a machine without accelerator"
)


def skeleton(cls: type[nn.Module], *, include_buffers: bool = False, **kwargs) -> nn.Module:
    with init_empty_weights(include_buffers=include_buffers):
        return cls(**kwargs)


def empty_linear(in_features: int = 4, out_features: int = 3) -> nn.Linear:
    return skeleton(nn.Linear, in_features=in_features, out_features=out_features)


# --- devices accepted and refused --------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "CPU", "meta", "cpu:0"])
def test_accepts_cpu_and_meta_devices(device):
    model = nn.Linear(2, 2)
    set_module_tensor_to_device(model, "weight", device)
    assert model.weight.device.type == str(device).lower().split(":")[0]


@NO_ACCELERATOR
@pytest.mark.parametrize(
    ("device", "match"),
    [
        (0, "no cuda device is available"),
        (1, "no cuda device is available"),
        ("0", "no cuda device is available"),
        ("cuda:1", "no cuda device is available"),
        ("cuda", "no cuda device is available"),
        (torch.device("cuda", 0), "no cuda device is available"),
        ("xpu", "no xpu device is available"),
        ("mps", "MPS is not available"),
    ],
)
def test_unavailable_accelerator_raises_device_error(device, match):
    model = empty_linear()
    with pytest.raises(DeviceError, match=match):
        set_module_tensor_to_device(model, "weight", device, value=torch.ones(3, 4))
    assert model.weight.is_meta


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "", "banana:0", -1, True, 1.5, None])
def test_unknown_device_raises_device_error(device):
    model = nn.Linear(2, 2)
    with pytest.raises(DeviceError):
        set_module_tensor_to_device(model, "weight", device)
    assert model.weight.device.type == "cpu"


@pytest.mark.parametrize("device", ["disk", "DISK", " disk "])
def test_disk_points_to_dispatch_model(device):
    model = empty_linear()
    with pytest.raises(DeviceError, match="dispatch_model"):
        set_module_tensor_to_device(model, "weight", device, value=torch.ones(3, 4))
    with pytest.raises(DeviceError, match="dispatch_model"):
        materialize(model, device, missing="zeros")
    assert model.weight.is_meta


def test_unknown_tensor_name_lists_what_the_module_has():
    model = BatchNormModel()
    with pytest.raises(UnknownTensorError, match="'bn.wieght'") as info:
        set_module_tensor_to_device(model, "bn.wieght", "cpu")
    assert "running_mean" in str(info.value) and isinstance(info.value, KeyError)
    with pytest.raises(UnknownTensorError, match="no submodule 'nope'"):
        set_module_tensor_to_device(model, "nope.weight", "cpu")


@pytest.mark.parametrize("missing", ["uninitialized", "empty", None])
def test_unknown_missing_policy_is_refused(missing):
    model = empty_linear()
    with pytest.raises(ValueError, match="missing="):
        set_module_tensor_to_device(model, "weight", "cpu", missing=missing)
    with pytest.raises(ValueError, match="missing="):
        materialize(model, "cpu", missing=missing)


# --- moving real tensors -----------------------------------------------------------------------
def test_real_move_keeps_parameter_class_requires_grad_and_identity():
    model = TaggedFrozenModel()
    tagged, frozen = model.tagged, model.frozen
    set_module_tensor_to_device(model, "tagged", "meta")
    set_module_tensor_to_device(model, "frozen", "meta")
    # emptying a tensor gives the slot a new object: other references keep their data
    assert not tagged.is_meta and not frozen.is_meta
    assert type(model.tagged) is TaggedParameter and model.tagged.tag == "q4"
    assert model.tagged.is_meta and model.tagged.requires_grad
    assert model.frozen.is_meta and not model.frozen.requires_grad


def test_real_move_with_dtype_updates_every_alias(tied_model):
    expected = tied_model.embed.weight.detach().to(torch.float16)
    set_module_tensor_to_device(tied_model, "head.weight", "cpu", dtype=torch.float16)
    assert tied_model.head.weight is tied_model.embed.weight
    assert tied_model.embed.weight.dtype == torch.float16
    assert torch.equal(tied_model.embed.weight, expected)
    assert isinstance(tied_model.embed.weight, nn.Parameter)


def test_real_to_meta_keeps_ties(tied_model, shared_parameter_model):
    set_module_tensor_to_device(tied_model, "embed.weight", "meta")
    assert tied_model.head.weight is tied_model.embed.weight and tied_model.head.weight.is_meta
    set_module_tensor_to_device(shared_parameter_model, "b.weight", "meta")
    assert shared_parameter_model.a.weight.is_meta


def test_real_move_does_not_cast_int_buffers(int_buffer_model):
    set_module_tensor_to_device(int_buffer_model, "position_ids", "cpu", dtype=torch.float16)
    set_module_tensor_to_device(int_buffer_model, "mask", "cpu", dtype=torch.float16)
    assert int_buffer_model.position_ids.dtype == torch.int64
    assert int_buffer_model.mask.dtype == torch.bool


def test_real_non_persistent_buffer_moves(rotary_model):
    expected = rotary_model.inv_freq.clone()
    set_module_tensor_to_device(rotary_model, "inv_freq", "cpu", dtype=torch.float64)
    assert rotary_model.inv_freq.dtype == torch.float64
    torch.testing.assert_close(rotary_model.inv_freq, expected.double())
    assert "inv_freq" in rotary_model._non_persistent_buffers_set
    assert "inv_freq" not in rotary_model.state_dict()


# --- meta to meta ------------------------------------------------------------------------------
def test_meta_to_meta_changes_dtype():
    model = empty_linear()
    weight = model.weight
    set_module_tensor_to_device(model, "weight", "meta", dtype=torch.float16)
    assert model.weight is weight
    assert model.weight.is_meta and model.weight.dtype == torch.float16
    assert type(model.weight) is nn.Parameter and model.weight.requires_grad
    assert model.bias.dtype == torch.float32


def test_meta_to_meta_with_value_drops_the_data():
    model = empty_linear()
    set_module_tensor_to_device(model, "weight", "meta", value=torch.ones(3, 4))
    assert model.weight.is_meta and model.weight.shape == (3, 4)


# --- meta to real with a value -----------------------------------------------------------------
def test_value_fills_meta_parameter():
    model = empty_linear()
    weight = model.weight
    value = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    set_module_tensor_to_device(model, "weight", "cpu", value=value)
    assert model.weight is weight  # identity kept: optimisers and ties see the new data
    assert torch.equal(model.weight, value)
    assert model.weight is not value
    assert model.weight.requires_grad and model.weight.is_leaf
    assert model.bias.is_meta


def test_value_shape_mismatch_names_fqn_and_both_shapes():
    model = skeleton(NestedBlocksModel)
    with pytest.raises(ShapeMismatchError, match=r"'layers\.1\.mlp\.0\.weight'") as info:
        set_module_tensor_to_device(model, "layers.1.mlp.0.weight", "cpu", value=torch.ones(8, 8))
    assert "(8, 8)" in str(info.value) and "(16, 8)" in str(info.value)
    assert model.layers[1].mlp[0].weight.is_meta


@pytest.mark.parametrize(
    ("value_dtype", "dtype", "expected"),
    [
        (torch.float64, None, torch.float32),  # the existing dtype
        (torch.float16, None, torch.float32),
        (torch.float64, torch.bfloat16, torch.bfloat16),  # the dtype asked for
        (torch.float32, torch.float16, torch.float16),
    ],
)
def test_float_value_is_cast(value_dtype, dtype, expected):
    model = empty_linear()
    value = torch.full((3, 4), 0.5, dtype=value_dtype)
    set_module_tensor_to_device(model, "weight", "cpu", value=value, dtype=dtype)
    assert model.weight.dtype == expected
    assert torch.all(model.weight == 0.5)


@pytest.mark.parametrize("value", [torch.arange(5, dtype=torch.int32), torch.ones(5).bool()])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_int_and_bool_values_are_never_cast(value, dtype):
    model = skeleton(IntBufferModel, include_buffers=True)
    set_module_tensor_to_device(model, "position_ids", "cpu", value=value, dtype=dtype)
    assert model.position_ids.dtype == value.dtype
    assert torch.equal(model.position_ids, value)


def test_value_with_autograd_history_is_stored_detached():
    model = skeleton(IntBufferModel, include_buffers=True)
    source = torch.ones(5, 5, requires_grad=True)
    set_module_tensor_to_device(model, "fc.weight", "cpu", value=source * 2)
    assert model.fc.weight.is_leaf and model.fc.weight.grad_fn is None
    buffer_source = torch.arange(5.0, requires_grad=True)
    model.register_buffer("extra", torch.empty(5, device="meta"))
    set_module_tensor_to_device(model, "extra", "cpu", value=buffer_source * 1)
    assert model.extra.grad_fn is None and not model.extra.requires_grad


def test_value_on_meta_is_refused():
    model = empty_linear()
    with pytest.raises(MetaTensorError, match="'weight'"):
        set_module_tensor_to_device(model, "weight", "cpu", value=torch.empty(3, 4, device="meta"))


def test_value_reaches_every_alias_of_a_tie():
    model = skeleton(TiedModel)
    value = torch.randn(16, 8)
    set_module_tensor_to_device(model, "head.weight", "cpu", value=value)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, value)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(ids), value[ids] @ value.T)


def test_value_reaches_every_alias_even_when_identity_cannot_be_kept():
    # A weak reference makes torch.utils.swap_tensors refuse; every alias must still be updated.
    model = skeleton(TiedModel)
    ref = weakref.ref(model.embed.weight)  # noqa: F841 (kept alive on purpose)
    value = torch.randn(16, 8)
    set_module_tensor_to_device(model, "head.weight", "cpu", value=value)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, value)


def test_value_fills_persistent_and_non_persistent_meta_buffers():
    with torch.device("meta"):
        model = MixedBuffersModel()
    set_module_tensor_to_device(model, "running", "cpu", value=torch.full((4,), 3.0))
    set_module_tensor_to_device(model, "table", "cpu", value=torch.arange(4.0))
    assert torch.equal(model.running, torch.full((4,), 3.0))
    assert torch.equal(model.table, torch.arange(4.0))
    assert "table" in model._non_persistent_buffers_set


# --- meta to real without a value --------------------------------------------------------------
def test_meta_without_value_names_fqn_owner_and_shape():
    model = skeleton(NestedBlocksModel)
    with pytest.raises(MetaTensorError, match=r"'layers\.2\.mlp\.0\.weight'") as info:
        set_module_tensor_to_device(model, "layers.2.mlp.0.weight", "cpu")
    message = str(info.value)
    assert "Linear" in message and "(16, 8)" in message
    assert "missing='init'" in message  # says what to do
    assert "Cannot copy out of meta" not in message
    assert model.layers[2].mlp[0].weight.is_meta


def test_missing_init_gives_exactly_reset_parameters_values():
    torch.manual_seed(SEED)
    eager = nn.Linear(7, 5)
    model = skeleton(nn.Linear, in_features=7, out_features=5)
    torch.manual_seed(SEED)
    materialize(model, "cpu", missing="init")
    assert torch.equal(model.weight, eager.weight)
    assert torch.equal(model.bias, eager.bias)
    assert not torch.equal(model.weight, torch.zeros(5, 7))


def test_missing_init_of_a_nested_model_matches_eager_construction():
    torch.manual_seed(SEED)
    eager = NestedBlocksModel()
    model = skeleton(NestedBlocksModel)
    torch.manual_seed(SEED)
    materialize(model, "cpu", missing="init")
    for name, tensor in eager.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_missing_init_one_tensor_runs_the_modules_init():
    model = empty_linear(in_features=100, out_features=50)
    set_module_tensor_to_device(model, "weight", "cpu", missing="init")
    bound = 1 / math.sqrt(100)  # kaiming_uniform_(a=sqrt(5)) bound for fan_in=100
    assert torch.isfinite(model.weight).all()
    assert model.weight.abs().max() <= bound and model.weight.std() > bound / 4
    assert model.bias.is_meta


def test_missing_init_keeps_a_loaded_weight_untouched():
    model = empty_linear(in_features=100, out_features=50)
    loaded = torch.full((50, 100), 7.0)
    set_module_tensor_to_device(model, "weight", "cpu", value=loaded)
    set_module_tensor_to_device(model, "bias", "cpu", missing="init")
    assert torch.equal(model.weight, loaded)
    assert torch.isfinite(model.bias).all() and model.bias.abs().max() <= 1 / math.sqrt(100)
    assert model.bias.std() > 0


def test_materialize_init_keeps_loaded_weight_untouched():
    model = skeleton(BatchNormModel)
    loaded = torch.full((6, 6), 3.0)
    set_module_tensor_to_device(model, "fc.weight", "cpu", value=loaded)
    materialize(model, "cpu", missing="init")
    assert torch.equal(model.fc.weight, loaded)
    assert not model.fc.bias.is_meta and torch.isfinite(model.fc.bias).all()


def test_missing_init_without_reset_parameters_names_the_module():
    model = skeleton(NoResetModule)
    with pytest.raises(NoInitError, match="'scale'") as info:
        set_module_tensor_to_device(model, "scale", "cpu", missing="init")
    assert "NoResetModule" in str(info.value)
    assert isinstance(info.value, MetaTensorError)
    assert model.scale.is_meta


def test_missing_init_with_init_fn():
    model = skeleton(NoResetModule)

    def fill(module: nn.Module) -> None:
        module.scale.fill_(0.25)

    materialize(model, "cpu", missing="init", init_fn=fill)
    assert torch.equal(model.scale, torch.full((3,), 0.25))


def test_init_fn_that_leaves_a_tensor_unset_is_an_error_not_garbage():
    model = skeleton(NoResetModule)
    with pytest.raises(NoInitError, match="'scale'"):
        materialize(model, "cpu", missing="init", init_fn=lambda module: None)


def test_missing_zeros_fills_zeros():
    model = skeleton(NestedBlocksModel)
    set_module_tensor_to_device(model, "layers.0.attn.0.weight", "cpu", missing="zeros")
    assert torch.equal(model.layers[0].attn[0].weight, torch.zeros(8, 8))
    assert model.layers[0].attn[0].weight.requires_grad
    materialize(model, "cpu", missing="zeros", dtype=torch.float16)
    assert all(torch.count_nonzero(t) == 0 for t in model.parameters())
    assert {t.dtype for t in model.parameters()} == {torch.float16}


def test_missing_zeros_on_persistent_buffers_keeps_int_dtype():
    model = skeleton(IntBufferModel, include_buffers=True)
    materialize(model, "cpu", missing="zeros", dtype=torch.float16)
    assert model.position_ids.dtype == torch.int64 and not model.position_ids.any()
    assert model.mask.dtype == torch.bool and not model.mask.any()
    assert model.fc.weight.dtype == torch.float16


def test_int_buffers_without_init_are_named():
    model = skeleton(IntBufferModel, include_buffers=True)
    with pytest.raises(NoInitError, match="'position_ids'") as info:
        materialize(model, "cpu", missing="init")
    assert "'mask'" in str(info.value) and "IntBufferModel" in str(info.value)
    assert devices_of(model) == {"meta"}


def test_batch_norm_stats_initialised_by_reset_parameters():
    model = skeleton(BatchNormModel, include_buffers=True)
    materialize(model, "cpu", missing="init")
    assert devices_of(model) == {"cpu"}
    assert torch.equal(model.bn.running_mean, torch.zeros(6))
    assert torch.equal(model.bn.running_var, torch.ones(6))
    assert model.bn.num_batches_tracked.dtype == torch.int64
    assert model.bn.num_batches_tracked.item() == 0
    assert torch.equal(model.bn.weight, torch.ones(6))
    model.train()(torch.randn(4, 6))  # usable: running stats update
    assert model.bn.num_batches_tracked.item() == 1


def test_batch_norm_real_stats_untouched_by_init():
    model = skeleton(BatchNormModel)  # buffers real
    model.bn.running_mean.fill_(5.0)
    model.bn.num_batches_tracked.fill_(9)
    materialize(model, "cpu", missing="init")
    assert torch.equal(model.bn.running_mean, torch.full((6,), 5.0))
    assert model.bn.num_batches_tracked.item() == 9


# --- materialize: all problems at once, nothing changed ----------------------------------------
def test_materialize_lists_every_meta_tensor_and_changes_nothing():
    model = skeleton(BatchNormModel, include_buffers=True)
    before = {name: t for name, t in all_tensors(model).items()}
    with pytest.raises(MetaTensorError) as info:
        materialize(model, "cpu")
    message = str(info.value)
    for name in before:
        assert f"'{name}'" in message, name
    assert message.startswith("7 tensor(s)")
    assert devices_of(model) == {"meta"}
    assert all(all_tensors(model)[name] is t for name, t in before.items())


def test_materialize_cuts_long_lists():
    model = skeleton(NestedBlocksModel)
    with pytest.raises(MetaTensorError, match=r"… and 18 more") as info:
        materialize(model, "cpu")
    assert str(info.value).startswith("28 tensor(s)")
    assert devices_of(model) == {"meta"}


def test_materialize_partly_loaded_model_fails_before_moving_anything():
    model = skeleton(NestedBlocksModel)
    loaded = torch.full((8, 8), 2.0)
    set_module_tensor_to_device(model, "embed.weight", "cpu", value=loaded)
    with pytest.raises(MetaTensorError) as info:
        materialize(model, "cpu", dtype=torch.float16)
    assert "'embed.weight'" not in str(info.value)
    assert "'embed.bias'" in str(info.value)
    assert model.embed.weight.dtype == torch.float32  # not cast: nothing changed
    assert torch.equal(model.embed.weight, loaded)


def test_materialize_no_init_lists_every_module_lacking_init():
    class TwoNoReset(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = NoResetModule()
            self.second = NoResetModule()
            self.ok = nn.Linear(2, 2)

    model = skeleton(TwoNoReset)
    with pytest.raises(NoInitError) as info:
        materialize(model, "cpu", missing="init")
    message = str(info.value)
    assert "'first.scale'" in message and "'second.scale'" in message
    assert "'ok.weight'" not in message
    assert devices_of(model) == {"meta"}


def test_materialize_returns_the_model_and_moves_real_tensors():
    model = NestedBlocksModel()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    assert materialize(model, "meta") is model
    assert devices_of(model) == {"meta"}
    model = NestedBlocksModel()
    model.load_state_dict(expected)
    materialize(model, "cpu", dtype=torch.float64)
    for name, value in expected.items():
        torch.testing.assert_close(model.state_dict()[name], value.double())


def test_materialize_keeps_ties_and_shared_modules():
    tied = skeleton(TiedModel)
    materialize(tied, "cpu", missing="init")
    assert tied.head.weight is tied.embed.weight and not tied.head.weight.is_meta
    assert torch.isfinite(tied.embed.weight).all() and tied.embed.weight.std() > 0.5

    shared = skeleton(SharedParameterModel)
    materialize(shared, "cpu", missing="zeros")
    assert shared.a.weight is shared.b.weight and not shared.a.weight.is_meta

    sub = skeleton(SharedSubmoduleModel)
    materialize(sub, "cpu", missing="init")
    assert sub.first is sub.second and not sub.first.weight.is_meta


def test_materialize_keeps_ties_when_identity_cannot_be_kept():
    model = skeleton(TiedModel)
    ref = weakref.ref(model.head.weight)  # noqa: F841 (kept alive on purpose)
    materialize(model, "cpu", missing="zeros")
    assert model.head.weight is model.embed.weight
    assert not model.embed.weight.is_meta


def test_materialize_keeps_parameter_subclass_and_requires_grad():
    model = skeleton(TaggedFrozenModel)
    materialize(model, "cpu", missing="zeros")
    assert type(model.tagged) is TaggedParameter and model.tagged.tag == "q4"
    assert not model.frozen.requires_grad and model.tagged.requires_grad
    assert devices_of(model) == {"cpu"}


@pytest.mark.parametrize("missing", ["error", "init", "zeros"])
def test_non_persistent_meta_buffer_is_a_skeleton_error(missing):
    with torch.device("meta"):  # torch's own context puts non-persistent buffers on meta
        model = RotaryModel()
    with pytest.raises(SkeletonError, match="'inv_freq'") as info:
        materialize(model, "cpu", missing=missing)
    assert "init_empty_weights" in str(info.value)
    assert model.inv_freq.is_meta and model.proj.weight.is_meta
    with pytest.raises(SkeletonError, match="'inv_freq'"):
        set_module_tensor_to_device(model, "inv_freq", "cpu", missing=missing)


def test_skeleton_from_init_empty_weights_materializes_with_real_rotary_buffer():
    model = skeleton(RotaryModel, include_buffers=True)
    eager_inv_freq = RotaryModel().inv_freq
    materialize(model, "cpu", missing="init")
    assert torch.equal(model.inv_freq, eager_inv_freq)
    assert devices_of(model) == {"cpu"}


def test_materialized_model_runs_like_eager(nested_blocks_model):
    model = skeleton(NestedBlocksModel)
    for name, value in nested_blocks_model.state_dict().items():
        set_module_tensor_to_device(model, name, "cpu", value=value)
    materialize(model, "cpu")  # nothing left on meta: no error
    x = torch.randn(2, 8)
    torch.testing.assert_close(model(x), nested_blocks_model(x))


# --- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_meta_to_cuda_with_init():
    torch.manual_seed(SEED)
    eager = nn.Linear(7, 5)
    model = skeleton(nn.Linear, in_features=7, out_features=5)
    torch.manual_seed(SEED)
    materialize(model, 0, missing="init")
    assert model.weight.device == torch.device("cuda", 0)
    assert model.weight.shape == eager.weight.shape and torch.isfinite(model.weight).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_to_cuda_with_value_keeps_ties():
    model = TiedModel()
    value = torch.randn(16, 8)
    set_module_tensor_to_device(model, "embed.weight", "cuda:0", value=value, dtype=torch.float16)
    assert model.head.weight is model.embed.weight
    assert model.embed.weight.device == torch.device("cuda", 0)
    assert model.embed.weight.dtype == torch.float16
    torch.testing.assert_close(model.embed.weight.cpu(), value.half())


# --- dtype: parsed, and never a non-float cast of a float tensor --------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, "int64", torch.bool, torch.complex64])
@pytest.mark.parametrize("with_value", [False, True])
def test_non_float_dtype_for_a_float_parameter_is_refused(dtype, with_value):
    model = nn.Linear(4, 3)
    before = model.weight.detach().clone()
    value = torch.ones(3, 4) if with_value else None
    with pytest.raises(DtypeError, match=r"'weight' is a torch.float32 tensor; dtype=torch\."):
        set_module_tensor_to_device(model, "weight", "cpu", value=value, dtype=dtype)
    assert torch.equal(model.weight, before)  # untouched


def test_dtype_given_as_a_name_is_parsed():
    model = nn.Linear(4, 3)
    set_module_tensor_to_device(model, "weight", "cpu", dtype="bf16")
    assert model.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", ["float17", 5, "torch.Tensor"])
def test_unknown_dtype_is_a_dtype_error(dtype):
    with pytest.raises(DtypeError, match="is not a torch dtype"):
        set_module_tensor_to_device(nn.Linear(4, 3), "weight", "cpu", dtype=dtype)


def test_int_dtype_for_an_int_buffer_is_allowed():
    model = IntBufferModel()
    set_module_tensor_to_device(model, "position_ids", "cpu", dtype=torch.int64)
    assert model.position_ids.dtype == torch.int64


def test_materialize_refuses_a_non_float_dtype():
    with pytest.raises(DtypeError, match="int8 is not a floating-point dtype"):
        materialize(nn.Linear(2, 2), "cpu", dtype=torch.int8)
