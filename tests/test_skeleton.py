"""Skeletons: init_empty_weights / init_on_device build any nn.Module with parameters on meta."""

from __future__ import annotations

import gc
import threading
import time

import psutil
import pytest
import torch
from torch import nn

from bigload import init_empty_weights, init_on_device
from bigload.devices import accelerator_type
from bigload.errors import DeviceError
from conftest import (
    SEED,
    BatchNormModel,
    DataDependentModel,
    IntBufferModel,
    MixedBuffersModel,
    NestedBlocksModel,
    RotaryModel,
    SharedParameterModel,
    SharedSubmoduleModel,
    TaggedFrozenModel,
    TaggedParameter,
    TiedModel,
    all_tensors,
    devices_of,
    rotary_inv_freq,
)

TORCH_REGISTER_PARAMETER = nn.Module.register_parameter
TORCH_REGISTER_BUFFER = nn.Module.register_buffer


def assert_torch_restored() -> None:
    assert nn.Module.register_parameter is TORCH_REGISTER_PARAMETER
    assert nn.Module.register_buffer is TORCH_REGISTER_BUFFER


# --- parameters and buffers --------------------------------------------------------------------
def test_parameters_on_meta_buffers_real_by_default():
    with init_empty_weights():
        model = BatchNormModel()
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"cpu"}
    assert torch.equal(model.bn.running_var, torch.ones(6))
    assert model.bn.num_batches_tracked.dtype == torch.int64
    assert model.fc.weight.shape == (6, 6)
    assert_torch_restored()


def test_include_buffers_moves_persistent_buffers_only():
    with init_empty_weights(include_buffers=True):
        bn = BatchNormModel()
        mixed = MixedBuffersModel()
        rotary = RotaryModel()
    assert bn.bn.running_mean.device.type == "meta"
    assert bn.bn.num_batches_tracked.device.type == "meta"
    assert bn.bn.num_batches_tracked.dtype == torch.int64
    assert mixed.running.device.type == "meta"
    assert mixed.table.device.type == "cpu"
    assert torch.equal(mixed.table, torch.arange(4, dtype=torch.float32))
    assert rotary.inv_freq.device.type == "cpu"
    assert "inv_freq" in rotary._non_persistent_buffers_set


@pytest.mark.parametrize("include_buffers", [False, True])
def test_non_persistent_buffer_equals_eager_model(include_buffers):
    eager = RotaryModel()
    with init_empty_weights(include_buffers=include_buffers):
        skeleton = RotaryModel()
    assert skeleton.proj.weight.is_meta
    assert not skeleton.inv_freq.is_meta
    torch.testing.assert_close(skeleton.inv_freq, eager.inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(skeleton.inv_freq, rotary_inv_freq(8))


def test_int_and_bool_buffers_keep_dtype_on_meta():
    with init_empty_weights(include_buffers=True):
        model = IntBufferModel()
    assert model.position_ids.is_meta and model.position_ids.dtype == torch.int64
    assert model.mask.is_meta and model.mask.dtype == torch.bool


def test_none_parameter_and_buffer_are_allowed():
    with init_empty_weights(include_buffers=True):
        linear = nn.Linear(3, 2, bias=False)
        linear.register_buffer("nothing", None)
    assert linear.bias is None and linear.nothing is None
    assert linear.weight.is_meta


def test_nested_model_every_parameter_on_meta():
    with init_empty_weights():
        model = NestedBlocksModel()
    eager = NestedBlocksModel()
    names = dict(model.named_parameters())
    assert names.keys() == dict(eager.named_parameters()).keys()
    assert all(p.is_meta for p in names.values())
    assert all(names[n].shape == p.shape for n, p in eager.named_parameters())
    assert type(model.layers[1].mlp[2].weight) is nn.Parameter


# --- ties --------------------------------------------------------------------------------------
def test_tie_made_in_init_survives():
    with init_empty_weights():
        model = TiedModel()
    assert model.head.weight is model.embed.weight
    assert model.head.weight.is_meta
    assert len(list(model.parameters())) == 1
    assert len(dict(model.named_parameters(remove_duplicate=False))) == 2


def test_parameter_registered_in_two_modules_stays_one_object():
    with init_empty_weights():
        model = SharedParameterModel()
    assert model.a.weight is model.b.weight
    assert model.a.weight.is_meta and model.a.weight.shape == (4, 4)


def test_parameter_object_from_outside_registered_twice_stays_one_object():
    shared = nn.Parameter(torch.ones(2, 2))
    with init_empty_weights():
        a, b = nn.Module(), nn.Module()
        a.register_parameter("w", shared)
        b.w = shared
    assert a.w is b.w
    assert a.w.is_meta
    assert not shared.is_meta  # the caller's own parameter is left as it was
    assert torch.equal(shared, torch.ones(2, 2))


def test_shared_submodule_stays_shared():
    with init_empty_weights():
        model = SharedSubmoduleModel()
    assert model.first is model.second
    assert model.first.weight.is_meta
    assert len(list(model.parameters())) == 2


# --- what __init__ may do ----------------------------------------------------------------------
def test_data_dependent_init_keeps_working():
    eager = DataDependentModel()
    with init_empty_weights(include_buffers=True):
        skeleton = DataDependentModel()
    assert skeleton.widths == eager.widths == [2, 4, 6, 8]
    assert skeleton.depth == eager.depth == 2
    assert [layer.in_features for layer in skeleton.layers] == [2, 4]
    assert devices_of(skeleton) == {"meta"}


def test_parameter_subclass_and_requires_grad_survive():
    with init_empty_weights():
        model = TaggedFrozenModel()
    assert type(model.tagged) is TaggedParameter
    assert model.tagged.tag == "q4"
    assert model.tagged.is_meta and model.tagged.requires_grad
    assert type(model.frozen) is nn.Parameter
    assert model.frozen.is_meta and not model.frozen.requires_grad


def test_meta_parameter_created_inside_a_cpu_block_stays_meta():
    # There is no data to copy: moving it would be "Cannot copy out of meta tensor".
    with init_on_device("cpu"):
        linear = nn.Linear(2, 2, device="meta")
    assert linear.weight.is_meta


# --- torch is restored -------------------------------------------------------------------------
def test_torch_restored_after_block():
    with init_empty_weights(include_buffers=True):
        assert nn.Module.register_parameter is not TORCH_REGISTER_PARAMETER
    assert_torch_restored()
    assert devices_of(BatchNormModel()) == {"cpu"}


def test_torch_restored_after_exception_in_block():
    with pytest.raises(ZeroDivisionError):
        with init_empty_weights(include_buffers=True):
            nn.Linear(2, 2)
            1 / 0  # noqa: B018
    assert_torch_restored()
    assert not nn.Linear(2, 2).weight.is_meta


def test_torch_restored_after_exception_in_nested_block():
    with pytest.raises(RuntimeError, match="inner"):
        with init_empty_weights():
            with init_on_device("cpu"):
                raise RuntimeError("inner")
    assert_torch_restored()


@pytest.mark.skipif(accelerator_type() is not None, reason="needs a machine without accelerator")
def test_unavailable_device_raises_before_patching():
    with pytest.raises(DeviceError, match="no cuda device is available"):
        with init_on_device(0):
            pass  # pragma: no cover
    assert_torch_restored()


# --- nesting and threads -----------------------------------------------------------------------
def test_cpu_block_inside_empty_block_builds_real_parameters():
    with init_empty_weights():
        before = nn.Linear(2, 2)
        with init_on_device("cpu"):
            inner = nn.Linear(2, 2)
        after = nn.Linear(2, 2)
    assert before.weight.is_meta and after.weight.is_meta
    assert inner.weight.device.type == "cpu" and inner.bias.device.type == "cpu"
    assert_torch_restored()


def test_cpu_block_builds_the_same_values_as_eager():
    torch.manual_seed(SEED)
    eager = NestedBlocksModel()
    with init_empty_weights():
        torch.manual_seed(SEED)
        with init_on_device("cpu"):
            inner = NestedBlocksModel()
    for (name, p), q in zip(eager.named_parameters(), inner.parameters()):
        assert torch.equal(p, q), name


def test_empty_block_inside_cpu_block_builds_meta():
    with init_on_device("cpu"):
        with init_empty_weights():
            inner = TiedModel()
        outer = TiedModel()
    assert inner.head.weight.is_meta and inner.head.weight is inner.embed.weight
    assert not outer.head.weight.is_meta and outer.head.weight is outer.embed.weight
    assert_torch_restored()


def test_innermost_block_decides_buffers():
    with init_empty_weights(include_buffers=True):
        with init_empty_weights(include_buffers=False):
            kept = BatchNormModel()
        moved = BatchNormModel()
    assert kept.bn.running_mean.device.type == "cpu" and kept.fc.weight.is_meta
    assert moved.bn.running_mean.is_meta


def test_same_context_entered_twice_in_a_row():
    for _ in range(2):
        with init_empty_weights():
            model = TiedModel()
        assert model.head.weight.is_meta
        assert_torch_restored()


def test_other_threads_build_real_models_while_a_block_is_open():
    built: list[nn.Module] = []

    def build() -> None:
        built.append(nn.Linear(3, 3))

    with init_empty_weights():
        worker = threading.Thread(target=build)
        worker.start()
        worker.join()
        here = nn.Linear(3, 3)
    assert here.weight.is_meta
    assert not built[0].weight.is_meta


# --- scale -------------------------------------------------------------------------------------
def test_hundred_billion_parameter_model_is_instant_and_lean():
    process = psutil.Process()
    gc.collect()
    rss_before = process.memory_info().rss
    start = time.perf_counter()
    with init_empty_weights():
        model = nn.Sequential(*(nn.Linear(10_000, 10_000) for _ in range(1000)))
    elapsed = time.perf_counter() - start
    rss_growth = process.memory_info().rss - rss_before
    assert sum(p.numel() for p in model.parameters()) == 1000 * (10_000 * 10_000 + 10_000)
    assert elapsed < 10, f"building took {elapsed:.1f} s"
    assert rss_growth < 200 * 2**20, f"RSS grew by {rss_growth / 2**20:.0f} MiB"
    assert model[999].weight.is_meta


# --- real transformers model code --------------------------------------------------------------
def test_transformers_llama_skeleton(tiny_llama_config):
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(tiny_llama_config)
    eager = LlamaForCausalLM(tiny_llama_config)

    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.model.embed_tokens.weight.shape == (100, 32)
    # transformers 5 ties in post_init() -> init_weights() -> tie_weights(), not in a submodule's
    # __init__; the tie is identity all the same, and it survives the skeleton context.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert eager.lm_head.weight is eager.model.embed_tokens.weight
    rotary = model.model.rotary_emb
    assert not rotary.inv_freq.is_meta
    assert "inv_freq" in rotary._non_persistent_buffers_set
    torch.testing.assert_close(rotary.inv_freq, eager.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert all_tensors(model).keys() == all_tensors(eager).keys()


def test_transformers_llama_non_persistent_buffers_real_with_include_buffers(tiny_llama_config):
    from transformers import LlamaForCausalLM

    with init_empty_weights(include_buffers=True):
        model = LlamaForCausalLM(tiny_llama_config)
    buffers = dict(model.named_buffers())
    assert buffers, "the tiny Llama should have rotary buffers"
    assert all(not b.is_meta for b in buffers.values())
    assert model.lm_head.weight is model.model.embed_tokens.weight
