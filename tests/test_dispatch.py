"""Running placed models: CPU and disk tiers, CPU offload, offload hooks chained between models,
ties across tiers, buffers, kwargs and caches, a transformers model generating, and a dispatched
model that still behaves like a normal model. Every output is compared with the eager model."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import bigload.runtime.hooks as dispatch_module
from bigload import (
    cpu_offload,
    cpu_offload_with_hook,
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
    remove_hooks,
)
from bigload.errors import DeviceError, DispatchError, OffloadedParameterError
from conftest import (
    BatchNormModel,
    KwargsCacheModel,
    NestedBlocksModel,
    ParentReadsChildModel,
    RotaryModel,
    TiedModel,
    all_tensors,
    rotary_inv_freq,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

MAPS = {
    "all-cpu": {"": "cpu"},
    "cpu+disk": {"embed": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "disk",
                 "norm": "disk"},
    "all-disk": {"": "disk"},
    "nested": {"embed": "disk", "layers.0": "cpu", "layers.1.attn": "disk",
               "layers.1.mlp": "cpu", "layers.2.mlp.0": "disk", "layers.2": "cpu",
               "norm": "cpu"},
    "module-list": {"embed": "cpu", "layers": "disk", "norm": "cpu"},
}


def skeleton(cls=NestedBlocksModel, *args, **kwargs) -> nn.Module:
    with init_empty_weights():
        return cls(*args, **kwargs)


def no_meta(model: nn.Module) -> bool:
    return all(t.device.type != "meta" for t in all_tensors(model).values())


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture
def eager() -> NestedBlocksModel:
    torch.manual_seed(0)
    return NestedBlocksModel().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def ckpt(tmp_path, eager) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), path)
    return path


def loaded(ckpt: Path, device_map, **kwargs) -> nn.Module:
    return load_checkpoint_and_dispatch(skeleton(), ckpt, device_map=device_map, **kwargs)


@pytest.fixture
def mixed(ckpt) -> nn.Module:
    return loaded(ckpt, MAPS["cpu+disk"])


# --- outputs equal the eager model under every map ----------------------------------------------

@pytest.mark.parametrize("name", list(MAPS))
def test_loaded_and_dispatched_equals_eager(ckpt, eager, x, name):
    model = loaded(ckpt, MAPS[name])
    assert no_meta(model)
    assert torch.equal(model(x), eager(x))
    assert torch.equal(model(x), eager(x))  # and again, after pages were released


@pytest.mark.parametrize("name", ["cpu+disk", "all-disk", "nested"])
def test_dispatch_model_of_a_model_in_memory(tmp_path, eager, x, name):
    model = copy.deepcopy(eager)
    dispatch_model(model, MAPS[name], offload_dir=tmp_path / "offload")
    assert torch.equal(model(x), eager(x))
    assert (tmp_path / "offload").is_dir()


def test_cpu_offload_equals_eager(eager, x):
    model = copy.deepcopy(eager)
    assert cpu_offload(model, "cpu") is model
    assert hook_count(model) > 0
    assert {t.device.type for t in all_tensors(model).values()} == {"cpu"}
    assert torch.equal(model(x), eager(x))


def test_cpu_offload_with_hook_chain_offloads_the_previous_model(x):
    torch.manual_seed(0)
    first, second = NestedBlocksModel().eval(), NestedBlocksModel().eval()
    expected = second(first(x))
    a, hook_a = cpu_offload_with_hook(copy.deepcopy(first), "cpu")
    b, hook_b = cpu_offload_with_hook(copy.deepcopy(second), "cpu", prev_module_hook=hook_a)
    assert (hook_a.on_device, hook_b.on_device) == (False, False)
    hidden = a(x)
    assert (hook_a.on_device, hook_b.on_device) == (True, False)
    out = b(hidden)
    assert (hook_a.on_device, hook_b.on_device) == (False, True)  # a offloaded when b ran
    assert torch.equal(out, expected)
    hook_b.offload()
    assert hook_b.on_device is False
    hook_a.remove()
    a(x)
    assert hook_a.on_device is False  # removed: running a no longer moves it


# --- ties, buffers, nested modules --------------------------------------------------------------

def test_tie_split_across_tiers_lands_on_one_device_with_a_warning(tmp_path, tied_model, caplog):
    path = tmp_path / "model.safetensors"
    save_file({"embed.weight": tied_model.embed.weight.detach()}, path)
    with caplog.at_level(logging.WARNING, logger="bigload"):
        model = load_checkpoint_and_dispatch(skeleton(TiedModel), path,
                                             device_map={"embed": "cpu", "head": "disk"})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("embed.weight" in m and "head.weight" in m for m in warnings)
    assert model.head.weight is model.embed.weight
    assert set(model.bigload_report.bytes_per_device) == {"cpu"}
    ids = torch.tensor([[1, 5, 7, 2]])
    assert torch.equal(model(ids), tied_model(ids))


def test_batchnorm_stats_served_from_a_disk_unit(tmp_path):
    torch.manual_seed(0)
    eager = BatchNormModel().train()
    for _ in range(3):
        eager(torch.randn(10, 6))
    eager.eval()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), path)
    model = load_checkpoint_and_dispatch(skeleton(BatchNormModel), path,
                                         device_map={"fc": "cpu", "bn": "disk"}).eval()
    assert torch.equal(model.bn.running_mean, eager.bn.running_mean)
    assert int(model.bn.num_batches_tracked) == 3
    x = torch.randn(4, 6)
    assert torch.equal(model(x), eager(x))
    assert torch.equal(model(x), eager(x))


def test_non_persistent_buffers_of_a_disk_model_stay_real(tmp_path, rotary_model):
    path = tmp_path / "model.safetensors"
    save_file(rotary_model.state_dict(), path)
    model = load_checkpoint_and_dispatch(skeleton(RotaryModel), path, device_map={"": "disk"})
    assert model.inv_freq.device.type == "cpu"
    torch.testing.assert_close(model.inv_freq, rotary_inv_freq(8), rtol=0, atol=1e-7)
    x = torch.randn(2, 8)
    assert torch.equal(model(x), rotary_model(x))


def test_kept_buffers_of_a_disk_unit_are_served(tmp_path):
    torch.manual_seed(0)
    eager = BatchNormModel().eval()
    state = {k: v for k, v in eager.state_dict().items()
             if k.startswith("fc.") or k in ("bn.weight", "bn.bias")}
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    model = load_checkpoint_and_dispatch(skeleton(BatchNormModel), path,
                                         device_map={"fc": "cpu", "bn": "disk"}).eval()
    assert set(model.bigload_report.kept) == {"bn.running_mean", "bn.running_var",
                                              "bn.num_batches_tracked"}
    x = torch.randn(4, 6)
    assert torch.equal(model(x), eager(x))


def test_weights_read_outside_their_modules_forward(tmp_path):
    torch.manual_seed(0)
    eager = ParentReadsChildModel()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), path)
    model = load_checkpoint_and_dispatch(skeleton(ParentReadsChildModel), path,
                                         device_map={"a": "cpu", "child": "disk"})
    x = torch.randn(2, 4)
    assert torch.equal(model(x), eager(x))
    assert torch.equal(model(x), eager(x))


# --- kwargs and caches --------------------------------------------------------------------------

@pytest.mark.parametrize("skip_keys", [None, "cache", ["cache"]])
def test_kwargs_reach_the_units_and_skip_keys_keep_the_cache_object(tmp_path, skip_keys):
    torch.manual_seed(0)
    eager = KwargsCacheModel()
    x = torch.randn(2, 4)
    expected = eager(x, cache={}, scale=2.5)
    model = copy.deepcopy(eager)
    model.block.seen.clear()
    dispatch_model(model, {"pre": "cpu", "block": "disk"}, offload_dir=tmp_path / "off",
                   skip_keys=skip_keys)
    cache = {"past": torch.zeros(1)}
    past = cache["past"]
    out = model(x, cache=cache, scale=2.5)
    assert torch.equal(out, expected)
    assert model.block.seen == [id(cache)]  # the very object, not a copy
    assert cache["steps"] == [2] and cache["past"] is past
    units = [u.name for u in model._bigload_dispatch.units]
    assert "block" in units  # the kwargs really went through a hook


# --- a transformers model -----------------------------------------------------------------------

def test_tiny_llama_with_a_disk_tier_generates_like_eager(tmp_path, tiny_llama_config):
    import transformers

    torch.manual_seed(0)
    source = transformers.LlamaForCausalLM(tiny_llama_config)
    source.save_pretrained(tmp_path / "llama", max_shard_size="50KB")
    state = {}
    for f in sorted((tmp_path / "llama").glob("*.safetensors")):
        state.update(load_file(f))
    eager = transformers.LlamaForCausalLM(tiny_llama_config).eval()
    result = eager.load_state_dict(state, strict=False)
    assert list(result.missing_keys) == ["lm_head.weight"] and not result.unexpected_keys
    eager.tie_weights()

    model = skeleton(transformers.LlamaForCausalLM, tiny_llama_config)
    model = load_checkpoint_and_dispatch(
        model, tmp_path / "llama", device_map="auto", max_memory={"cpu": "80KB"},
        no_split_module_classes=["LlamaDecoderLayer"],
    ).eval()
    assert "disk" in model.bigload_report.bytes_per_device
    assert "disk" in {str(v) for v in model.hf_device_map.values()}
    assert no_meta(model)
    assert model.device == torch.device("cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, eager(ids).logits)
    expected = eager.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)


# --- a dispatched model stays a normal model ----------------------------------------------------

def test_state_dict_is_real_and_equals_the_checkpoint(mixed, ckpt):
    state = mixed.state_dict()
    stored = load_file(ckpt)
    assert set(state) == set(stored)
    for name, value in state.items():
        assert value.device.type == "cpu", name
        assert torch.equal(value, stored[name]), name
    assert all(p.device.type == "cpu" for _, p in mixed.named_parameters())


def test_to_cpu_is_a_no_op(mixed, eager, x):
    assert mixed.to("cpu") is mixed
    assert mixed.to(torch.device("cpu")) is mixed
    assert torch.equal(mixed(x), eager(x))


def test_to_another_dtype_is_refused(mixed, eager, x):
    with pytest.raises(DispatchError, match="dtype"):
        mixed.to(torch.float16)
    assert mixed.embed.weight.dtype == torch.float32
    assert torch.equal(mixed(x), eager(x))


def test_half_is_refused_like_to_float16(mixed):
    disk_weight = mixed.layers[1].mlp[0].weight
    file_size = disk_weight.untyped_storage().nbytes()
    with pytest.raises(DispatchError):
        mixed.half()
    assert mixed.layers[1].mlp[0].weight.dtype == torch.float32
    assert mixed.layers[1].mlp[0].weight.untyped_storage().nbytes() == file_size


def test_to_its_own_dtype_is_a_no_op(mixed):
    assert mixed.to(torch.float32) is mixed


def test_to_meta_is_refused(mixed):
    with pytest.raises(DispatchError):
        mixed.to("meta")
    assert no_meta(mixed)


def test_to_an_accelerator_is_refused_with_dispatch_error(mixed):
    with pytest.raises(DispatchError):
        mixed.to("cuda:0")


def test_to_an_unavailable_accelerator_is_a_bigload_error(mixed):
    if torch.cuda.is_available():
        pytest.skip("only meaningful without CUDA")
    with pytest.raises((DispatchError, DeviceError)):
        mixed.to("cuda:0")
    assert {p.device.type for p in mixed.parameters()} == {"cpu"}


@pytest.mark.parametrize("name", ["cpu+disk", "module-list"])
def test_in_place_edit_of_a_disk_weight_raises_at_the_next_forward(ckpt, x, name):
    model = loaded(ckpt, MAPS[name])
    model(x)
    with torch.no_grad():
        model.layers[1].mlp[0].weight.add_(1.0)
    with pytest.raises(OffloadedParameterError, match="'layers.1.mlp.0.weight'"):
        model(x)


def test_in_place_edit_of_a_cpu_tier_weight_is_kept(mixed, eager, x):
    with torch.no_grad():
        mixed.embed.weight.mul_(2.0)
        eager.embed.weight.mul_(2.0)
    assert torch.equal(mixed(x), eager(x))


def test_in_place_edit_under_cpu_offload_is_kept(eager, x):
    model = cpu_offload(copy.deepcopy(eager), "cpu")
    with torch.no_grad():
        model.layers[2].mlp[2].bias.add_(0.5)
        eager.layers[2].mlp[2].bias.add_(0.5)
    assert torch.equal(model(x), eager(x))


def test_backward_through_offloaded_weights_on_cpu(mixed, eager, x):
    mixed(x).square().sum().backward()
    eager(x).square().sum().backward()
    grads = dict(eager.named_parameters())
    for name, param in mixed.named_parameters():
        assert param.grad is not None, name
        assert torch.equal(param.grad, grads[name].grad), name


def test_deepcopy_gives_same_outputs_and_independent_hooks(mixed, eager, x):
    clone = copy.deepcopy(mixed)
    assert torch.equal(clone(x), eager(x))
    remove_hooks(clone)
    assert hook_count(clone) == 0
    assert hook_count(mixed) > 0
    assert torch.equal(mixed(x), eager(x))
    with pytest.raises(DispatchError):
        mixed.to(torch.float16)
    assert clone.to(torch.float64) is clone  # a plain module again
    assert clone.embed.weight.dtype == torch.float64


def test_remove_hooks_removes_every_hook_and_keeps_the_users(mixed, eager, x):
    calls = []
    handle = mixed.norm.register_forward_hook(lambda *_: calls.append("user"))
    remove_hooks(mixed)
    assert hook_count(mixed) == 1  # only the user's
    assert "to" not in mixed.__dict__
    assert not [k for m in mixed.modules() for k in m.__dict__ if k.startswith("_bigload")
                and k != "_bigload_store"]
    assert torch.equal(mixed(x), eager(x))
    assert calls == ["user"]
    handle.remove()
    assert hook_count(mixed) == 0
    assert remove_hooks(mixed) is mixed  # twice is fine


def test_dispatching_again_does_not_stack_hooks(ckpt, eager, x):
    model = loaded(ckpt, MAPS["cpu+disk"])
    count = hook_count(model)
    dispatch_model(model, MAPS["cpu+disk"])
    assert hook_count(model) == count
    assert torch.equal(model(x), eager(x))


# --- accelerators -------------------------------------------------------------------------------

@pytest.mark.gpu
@cuda
def test_cpu_offload_to_gpu_with_prefetch_equals_eager(eager, x):
    expected = eager.cuda()(x.cuda())
    model = cpu_offload(copy.deepcopy(eager).cpu(), 0)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    out = model(x.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, expected)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.gpu
@cuda
def test_cpu_and_disk_tiers_run_on_gpu(ckpt, eager, x):
    model = load_checkpoint_and_dispatch(
        skeleton(), ckpt, device_map={"embed": 0, "layers.0": "cpu", "layers.1": "disk",
                                      "layers.2": "disk", "norm": 0})
    out = model(x.cuda())
    torch.testing.assert_close(out.cpu(), eager(x))
    assert model.layers[1].mlp[0].weight.device.type == "cpu"  # swapped back out


@pytest.mark.gpu
@cuda
def test_weights_read_outside_their_forward_on_gpu(tmp_path):
    torch.manual_seed(0)
    eager = ParentReadsChildModel()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), path)
    # the parent reads the child's weight itself: it is named a preload module (as in accelerate)
    model = load_checkpoint_and_dispatch(skeleton(ParentReadsChildModel), path,
                                         device_map={"a": 0, "child": "disk"},
                                         preload_module_classes=["ParentReadsChildModel"])
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x.cuda()).cpu(), eager(x))


@pytest.mark.gpu
@cuda
def test_tie_across_tiers_runs_on_gpu(tmp_path, tied_model):
    path = tmp_path / "model.safetensors"
    save_file({"embed.weight": tied_model.embed.weight.detach()}, path)
    model = skeleton(TiedModel)
    load_checkpoint_in_model(model, path, device_map={"embed": "disk", "head": "cpu"})
    dispatch_model(model, {"embed": "disk", "head": "cpu"}, main_device=0)
    ids = torch.tensor([[1, 5, 7, 2]])
    torch.testing.assert_close(model(ids.cuda()).cpu(), tied_model(ids))


@pytest.mark.gpu
@two_gpus
def test_map_over_two_gpus(ckpt, eager, x):
    model = load_checkpoint_and_dispatch(
        skeleton(), ckpt, device_map={"embed": 0, "layers.0": 0, "layers.1": 1, "layers.2": 1,
                                      "norm": 1})
    assert model.layers[2].mlp[0].weight.device == torch.device("cuda", 1)
    out = model(x.cuda(0))
    assert out.device == torch.device("cuda", 0)  # back where the input came from
    torch.testing.assert_close(out.cpu(), eager(x))


# --- the accelerator swap path, exercised on the CPU ------------------------------------------
@pytest.fixture
def swapping(monkeypatch):
    """Make offloaded units swap their weights in and out as they do on an accelerator (the
    copies are CPU tensors here): the swap bookkeeping is tested without a GPU."""
    monkeypatch.setattr(dispatch_module.Unit, "swaps",
                        property(lambda unit: unit.offloaded))


def test_swap_path_keeps_outputs_identity_and_stored_tensors(swapping, ckpt, eager, x):
    model = loaded(ckpt, {"embed": "cpu", "layers.0": "cpu", "layers.1": "disk",
                          "layers.2": "disk", "norm": "cpu"})
    weight = model.layers[1].mlp[0].weight
    stored = model.layers[1].mlp[0].weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))
        assert torch.equal(model(x), eager(x))
    assert model.layers[1].mlp[0].weight is weight  # identity kept through swap in/out
    assert model.layers[1].mlp[0].weight.data_ptr() == stored  # back on its stored tensor
    state = model.__dict__[dispatch_module.STATE_ATTR]
    assert state.swapped == {} and state.swapped_by == {}


def test_tie_alias_in_a_resident_unit_borrows_the_offloaded_tensor(swapping, tmp_path, tied_model):
    path = tmp_path / "model.safetensors"
    save_file({"embed.weight": tied_model.embed.weight.detach()}, path)
    model = skeleton(TiedModel)
    # the head runs where it is (not offloaded) while the tie's owner, the embedding, pages in
    load_checkpoint_and_dispatch(model, path, device_map={"embed": "disk", "head": "cpu"})
    state = model.__dict__[dispatch_module.STATE_ATTR]
    head = next(u for u in state.units if u.name == "head")
    assert [s.fqn for s in head.borrowed] == ["embed.weight"]
    ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids), tied_model(ids))
    assert state.swapped == {}


def test_preload_module_classes_page_a_childs_weights_in_around_the_parent(
    swapping, tmp_path
):
    torch.manual_seed(0)
    eager = ParentReadsChildModel()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), path)
    model = load_checkpoint_and_dispatch(skeleton(ParentReadsChildModel), path,
                                         device_map={"a": "cpu", "child": "disk"},
                                         preload_module_classes=["ParentReadsChildModel"])
    state = model.__dict__[dispatch_module.STATE_ATTR]
    child = next(u for u in state.units if u.name == "child")
    assert child.module is model  # hooked at the parent, whose forward reads child.weight
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))
    assert state.swapped == {}
