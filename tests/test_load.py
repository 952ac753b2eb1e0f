"""load_checkpoint_in_model / load_checkpoint_and_dispatch: every tensor streamed to its place,
cast on the way, zero-copy where it can be, missing tensors by policy, a truthful LoadReport, every
checkpoint layout, and typed errors that leave the model untouched. Each loaded model is compared
with a plain eager ``load_state_dict`` of the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import bigload
from bigload import init_empty_weights, load_checkpoint_and_dispatch, load_checkpoint_in_model
from bigload.errors import (
    BigloadError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    DeviceMapError,
    NoInitError,
    OffloadError,
)
from bigload.loader import LoadReport
from conftest import (
    BatchNormModel,
    IntBufferModel,
    NestedBlocksModel,
    NoResetModule,
    RotaryModel,
    TiedModel,
    all_tensors,
)


def skeleton(cls, *args, include_buffers: bool = False, **kwargs) -> nn.Module:
    with init_empty_weights(include_buffers=include_buffers):
        return cls(*args, **kwargs)


def no_meta(model: nn.Module) -> bool:
    return all(t.device.type != "meta" for t in all_tensors(model).values())


def all_meta(model: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())


def eager_load(cls, state: dict[str, torch.Tensor], *args, strict: bool = True, **kwargs):
    model = cls(*args, **kwargs)
    model.load_state_dict(state, strict=strict)
    return model.eval()


@pytest.fixture
def nested_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return NestedBlocksModel().state_dict()


@pytest.fixture
def nested_file(tmp_path, nested_state) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(nested_state, path)
    return path


def assert_same_outputs(model: nn.Module, eager: nn.Module, x: torch.Tensor | None = None):
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(9)) if x is None else x
    with torch.no_grad():
        assert torch.equal(model(x), eager(x))


# --- streaming, zero-copy -----------------------------------------------------------------------

@pytest.mark.parametrize("memory", ["plentiful", "short"])
def test_cpu_load_equals_eager_as_views_or_memory_of_its_own(
    tmp_path, nested_file, nested_state, memory, monkeypatch
):
    import bigload.loader as loader_module

    if memory == "short":  # the page cache cannot hold the CPU tier
        monkeypatch.setattr(loader_module, "cache_can_hold", lambda nbytes: False)
    model = skeleton(NestedBlocksModel)
    report = load_checkpoint_in_model(model, nested_file)
    assert no_meta(model)
    # with memory to spare, the CPU tier is the file's pages, mapped (zero copy); where it is
    # short, memory of its own that no page-cache pressure can take back
    zero_copy = len(nested_state) if memory == "plentiful" else 0
    assert len(report.loaded) == len(nested_state) and report.zero_copy == zero_copy
    assert report.cast == {} and report.bytes_written == 0 and report.offload_folder is None
    # either way each parameter has a storage of exactly its bytes (torch.save writes it alone)
    for p in model.parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == len(
        list(model.parameters()))
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert_same_outputs(model, eager_load(NestedBlocksModel, nested_state))


def test_editing_a_zero_copy_tensor_never_changes_the_file(nested_file, nested_state):
    before = nested_file.read_bytes()
    model = skeleton(NestedBlocksModel)
    load_checkpoint_in_model(model, nested_file)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    assert nested_file.read_bytes() == before
    assert torch.equal(model.embed.weight, nested_state["embed.weight"] + 1.0)


def test_loading_into_a_real_model_replaces_its_values(nested_file, nested_state):
    torch.manual_seed(99)
    model = NestedBlocksModel()
    params = dict(model.named_parameters())
    report = load_checkpoint_in_model(model, nested_file)
    assert len(report.loaded) == len(nested_state)
    assert all(p is params[n] for n, p in model.named_parameters())  # identity kept
    assert_same_outputs(model, eager_load(NestedBlocksModel, nested_state))


# --- casting ------------------------------------------------------------------------------------

def test_dtype_casts_floats_and_never_int_buffers(tmp_path):
    torch.manual_seed(0)
    eager = IntBufferModel()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), path)
    model = skeleton(IntBufferModel, include_buffers=True)
    report = load_checkpoint_in_model(model, path, dtype=torch.float16)
    assert model.fc.weight.dtype == model.fc.bias.dtype == torch.float16
    assert model.position_ids.dtype == torch.int64 and model.mask.dtype == torch.bool
    assert torch.equal(model.position_ids, eager.position_ids)
    assert torch.equal(model.mask, eager.mask)
    assert report.cast == {"fc.weight": "float32->float16", "fc.bias": "float32->float16"}
    assert report.zero_copy == 2  # the int buffers, not cast: views of the file (memory to spare)
    assert torch.equal(model.fc.weight, eager.fc.weight.half())


def test_dtype_given_as_a_string(nested_file, nested_state):
    model = skeleton(NestedBlocksModel)
    load_checkpoint_in_model(model, nested_file, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.embed.weight, nested_state["embed.weight"].bfloat16())


def test_unknown_dtype_string_is_a_value_error(nested_file):
    model = skeleton(NestedBlocksModel)
    with pytest.raises(ValueError, match="float17"):
        load_checkpoint_in_model(model, nested_file, dtype="float17")
    assert all_meta(model)


def test_non_float_dtype_is_refused_before_loading(nested_file):
    model = skeleton(NestedBlocksModel)
    with pytest.raises(ValueError, match="int8"):
        load_checkpoint_in_model(model, nested_file, dtype=torch.int8)
    assert all_meta(model)


def test_without_dtype_tensors_take_the_models_dtype(tmp_path, nested_state):
    path = tmp_path / "model.safetensors"
    save_file({k: v.half() for k, v in nested_state.items()}, path)
    model = skeleton(NestedBlocksModel)
    report = load_checkpoint_in_model(model, path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert report.cast["embed.weight"] == "float16->float32"
    assert len(report.cast) == len(nested_state) and report.zero_copy == 0
    eager = eager_load(NestedBlocksModel, {k: v.half() for k, v in nested_state.items()})
    assert_same_outputs(model, eager)


def test_keep_in_fp32_modules_stay_fp32(nested_file, nested_state):
    model = skeleton(NestedBlocksModel)
    report = load_checkpoint_in_model(model, nested_file, dtype=torch.bfloat16,
                                      keep_in_fp32_modules=["norm"])
    assert model.norm.weight.dtype == model.norm.bias.dtype == torch.float32
    assert model.embed.weight.dtype == model.layers[0].mlp[0].weight.dtype == torch.bfloat16
    assert "norm.weight" not in report.cast and "embed.weight" in report.cast
    assert torch.equal(model.norm.weight, nested_state["norm.weight"])


def test_keep_in_fp32_modules_matches_nested_module_names(nested_file):
    model = skeleton(NestedBlocksModel)
    load_checkpoint_in_model(model, nested_file, dtype=torch.float16,
                             keep_in_fp32_modules=["mlp"])
    assert model.layers[1].mlp[2].weight.dtype == torch.float32
    assert model.layers[1].attn[0].weight.dtype == torch.float16


# --- missing policies ---------------------------------------------------------------------------

class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_missing_init_runs_the_modules_own_reset_parameters(tmp_path):
    path = tmp_path / "model.safetensors"
    a_state = {"a.weight": torch.full((4, 4), 0.5), "a.bias": torch.zeros(4)}
    save_file(a_state, path)
    model = skeleton(TwoLinears)
    torch.manual_seed(5)
    report = load_checkpoint_in_model(model, path, missing="init")
    torch.manual_seed(5)
    reference = nn.Linear(4, 3)  # the eager construction under the same seed
    assert torch.equal(model.b.weight, reference.weight)
    assert torch.equal(model.b.bias, reference.bias)
    assert torch.equal(model.a.weight, a_state["a.weight"])
    assert set(report.initialized) == {"b.weight", "b.bias"}
    assert "reset_parameters" in report.initialized["b.weight"]
    assert sorted(report.loaded) == ["a.bias", "a.weight"]
    assert "b.weight" in str(report)
    assert no_meta(model)


def test_missing_init_of_a_whole_model_equals_eager_construction(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"norm.weight": torch.full((8,), 2.0)}, path)
    torch.manual_seed(7)
    model = skeleton(NestedBlocksModel)
    torch.manual_seed(7)
    report = load_checkpoint_in_model(model, path, missing="init")
    torch.manual_seed(7)
    eager = NestedBlocksModel()
    eager.norm.weight.data.fill_(2.0)
    assert len(report.initialized) == len(eager.state_dict()) - 1
    for name, value in eager.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_missing_zeros(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.ones(4, 4), "a.bias": torch.ones(4)}, path)
    model = skeleton(TwoLinears)
    report = load_checkpoint_in_model(model, path, missing="zeros")
    assert torch.equal(model.b.weight, torch.zeros(3, 4))
    assert torch.equal(model.b.bias, torch.zeros(3))
    assert report.initialized == {"b.weight": "zeros", "b.bias": "zeros"}


def test_missing_init_without_reset_parameters_is_refused_before_loading(tmp_path):
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.extra = NoResetModule()

    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file(nn.Linear(3, 3).state_dict(), path)
    model = skeleton(Holder)
    with pytest.raises(NoInitError, match="'extra.scale'"):
        load_checkpoint_in_model(model, path, key_map={"^": "fc."}, missing="init")
    assert all_meta(model)


def test_unknown_missing_policy_is_a_value_error(nested_file):
    with pytest.raises(ValueError, match="uninitialised"):
        load_checkpoint_in_model(skeleton(NestedBlocksModel), nested_file,
                                 missing="uninitialised")


# --- LoadReport ---------------------------------------------------------------------------------

def test_load_report_fields_str_and_json(tmp_path, tied_model):
    path = tmp_path / "model.safetensors"
    state = {"embed.weight": tied_model.embed.weight.detach().half(), "junk": torch.zeros(2)}
    save_file(state, path)
    model = skeleton(TiedModel)
    report = load_checkpoint_in_model(model, path)
    assert isinstance(report, LoadReport)
    assert report.loaded == ["embed.weight"]
    assert report.tied == [("embed.weight", "head.weight")]
    assert report.unexpected == ["junk"]
    assert report.cast == {"embed.weight": "float16->float32"}
    assert report.bytes_per_device == {"cpu": 16 * 8 * 4}
    assert report.initialized == {}
    assert report.seconds > 0
    data = json.loads(json.dumps(report.to_dict()))
    assert data["loaded"] == ["embed.weight"]
    assert data["tied"] == [["embed.weight", "head.weight"]]
    assert data["bytes_per_device"] == {"cpu": 512}
    text = str(report)
    assert "TiedModel" in text and "tied groups: 1" in text and "unexpected" in text
    assert "cast: 1" in text


def test_bytes_per_device_over_cpu_and_disk(nested_file, nested_state):
    model = load_checkpoint_and_dispatch(
        skeleton(NestedBlocksModel), nested_file,
        device_map={"embed": "cpu", "layers": "disk", "norm": "cpu"},
    )
    report = model.bigload_report
    nbytes = {k: v.numel() * 4 for k, v in nested_state.items()}
    disk = sum(v for k, v in nbytes.items() if k.startswith("layers."))
    assert report.bytes_per_device == {"disk": disk, "cpu": sum(nbytes.values()) - disk}
    assert json.loads(json.dumps(report.to_dict()))["bytes_per_device"]["disk"] == disk


# --- layouts ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        tie_word_embeddings=True, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, vocab_size=100,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("llama")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    model.save_pretrained(root / "single")
    state = model.state_dict()
    del state["lm_head.weight"]  # tied: stored once, like save_pretrained does
    _save_sharded_bin(state, root / "sharded_bin", parts=3)
    torch.save(state, root / "pytorch_model.bin")
    return transformers, config, model, root


def _save_sharded_bin(state: dict[str, torch.Tensor], folder: Path, parts: int) -> None:
    """transformers v5 writes safetensors only: the pytorch_model.bin.index.json layout by hand,
    the way v4's save_pretrained(safe_serialization=False) wrote it."""
    folder.mkdir()
    keys = list(state)
    weight_map = {}
    for i in range(parts):
        name = f"pytorch_model-{i + 1:05d}-of-{parts:05d}.bin"
        chunk = {k: state[k].clone() for k in keys[i::parts]}
        torch.save(chunk, folder / name)
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size()
                                            for v in state.values())}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _eager_llama(transformers, config, state):
    eager = transformers.LlamaForCausalLM(config).eval()
    result = eager.load_state_dict(state, strict=False)
    assert list(result.missing_keys) == ["lm_head.weight"] and not result.unexpected_keys
    eager.tie_weights()
    return eager


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors":
            state.update(load_file(f))
        elif f.suffix == ".bin":
            state.update(torch.load(f, weights_only=True))
    return state


@pytest.mark.parametrize("layout", ["single", "sharded", "sharded_bin", "pytorch_model.bin"])
def test_layouts_load_and_match_eager(llama_folders, layout):
    transformers, config, _, root = llama_folders
    path = root / layout
    if layout == "sharded":
        assert len(list(path.glob("*.safetensors"))) >= 3
        assert (path / "model.safetensors.index.json").is_file()
    model = skeleton(transformers.LlamaForCausalLM, config)
    report = load_checkpoint_in_model(model, path, unexpected="error")
    assert no_meta(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert ("model.embed_tokens.weight", "lm_head.weight") in report.tied
    # with memory to spare a CPU load maps safetensors' pages (zero copy); .bin is read
    views = 0 if "bin" in layout else len(report.loaded)
    assert report.zero_copy == views
    state = _read_all(path) if path.is_dir() else torch.load(path, weights_only=True)
    eager = _eager_llama(transformers, config, state)
    ids = torch.tensor([[1, 7, 42, 3]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, eager(ids).logits)


def test_sharded_bin_to_disk_needs_and_uses_an_offload_folder(llama_folders, tmp_path):
    transformers, config, _, root = llama_folders
    dmap = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = skeleton(transformers.LlamaForCausalLM, config)
    with pytest.raises(OffloadError, match="offload_folder"):
        load_checkpoint_and_dispatch(model, root / "sharded_bin", device_map=dmap)
    assert all_meta(model)
    model = load_checkpoint_and_dispatch(model, root / "sharded_bin", device_map=dmap,
                                         offload_folder=tmp_path / "offload")
    assert model.bigload_report.bytes_written > 0
    eager = _eager_llama(transformers, config, _read_all(root / "sharded_bin"))
    ids = torch.tensor([[1, 7, 42, 3]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, eager(ids).logits)


# --- load_checkpoint_and_dispatch ---------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["auto", "balanced", "sequential"])
def test_dispatch_strategies_on_cpu_equal_eager(nested_file, nested_state, strategy):
    model = load_checkpoint_and_dispatch(skeleton(NestedBlocksModel), nested_file,
                                         device_map=strategy, max_memory={"cpu": "1GiB"})
    assert model.bigload_plan is not None
    assert model.bigload_report.loaded
    assert no_meta(model)
    assert_same_outputs(model, eager_load(NestedBlocksModel, nested_state))


def test_dispatch_without_a_map_loads_onto_cpu(nested_file, nested_state):
    model = load_checkpoint_and_dispatch(skeleton(NestedBlocksModel), nested_file)
    assert model.bigload_plan.single_placement == torch.device("cpu")  # where the skeleton was
    assert len(model.bigload_report.loaded) == len(nested_state)
    assert_same_outputs(model, eager_load(NestedBlocksModel, nested_state))


def test_strict_turns_unexpected_into_an_error(tmp_path, nested_state):
    path = tmp_path / "model.safetensors"
    save_file({**nested_state, "stray": torch.zeros(1)}, path)
    model = skeleton(NestedBlocksModel)
    with pytest.raises(CheckpointMismatchError, match="'stray'"):
        load_checkpoint_and_dispatch(model, path, device_map={"": "cpu"}, strict=True)
    assert all_meta(model)


def test_batchnorm_stats_and_int_buffer_come_from_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    eager = BatchNormModel().train()
    for _ in range(3):
        eager(torch.randn(10, 6))
    eager.eval()
    path = tmp_path / "model.safetensors"
    save_file(eager.state_dict(), path)
    model = skeleton(BatchNormModel, include_buffers=True)
    load_checkpoint_in_model(model, path, dtype=torch.float64)
    assert model.bn.num_batches_tracked.dtype == torch.int64
    assert int(model.bn.num_batches_tracked) == 3
    assert model.bn.running_mean.dtype == torch.float64
    assert torch.equal(model.bn.running_var, eager.bn.running_var.double())
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(model.eval()(x), eager.double()(x), rtol=0, atol=0)


def test_non_persistent_buffers_stay_real_through_a_load(tmp_path, rotary_model):
    path = tmp_path / "model.safetensors"
    save_file(rotary_model.state_dict(), path)
    model = skeleton(RotaryModel)
    load_checkpoint_in_model(model, path, dtype=torch.float16)
    assert no_meta(model)
    assert model.inv_freq.dtype == torch.float32  # not in the checkpoint: never cast
    assert torch.equal(model.inv_freq, rotary_model.inv_freq)


# --- bad input ----------------------------------------------------------------------------------

def test_nonexistent_path_is_a_typed_error_naming_it(tmp_path):
    missing = tmp_path / "nope"
    model = skeleton(NestedBlocksModel)
    with pytest.raises(CheckpointNotFoundError, match=str(missing)) as info:
        load_checkpoint_in_model(model, missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, BigloadError)
    assert all_meta(model)


def test_empty_folder_is_a_typed_error_naming_it(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    model = skeleton(NestedBlocksModel)
    with pytest.raises(CheckpointNotFoundError, match=str(folder)):
        load_checkpoint_and_dispatch(model, folder, device_map="auto")
    assert all_meta(model)


def test_shape_mismatch_at_the_load_level_leaves_the_model_untouched(tmp_path, nested_state):
    path = tmp_path / "model.safetensors"
    save_file({**nested_state, "layers.2.mlp.2.weight": torch.zeros(8, 15)}, path)
    model = skeleton(NestedBlocksModel)
    with pytest.raises(CheckpointMismatchError,
                       match=r"'layers.2.mlp.2.weight'.*\(8, 16\).*\(8, 15\)"):
        load_checkpoint_and_dispatch(model, path, device_map={"": "cpu"})
    assert all_meta(model)
    assert not hasattr(model, "bigload_report")


def test_device_map_that_misses_a_module_is_refused_before_loading(nested_file):
    model = skeleton(NestedBlocksModel)
    with pytest.raises(DeviceMapError, match="norm"):
        load_checkpoint_in_model(model, nested_file, device_map={"embed": "cpu", "layers": "cpu"})
    assert all_meta(model)


def test_error_names_the_checkpoint_file_not_only_its_folder(tmp_path, nested_state):
    path = tmp_path / "weights-a.safetensors"
    save_file({k: v for k, v in nested_state.items() if k != "norm.bias"}, path)
    save_file(nested_state, tmp_path / "weights-b.safetensors")
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_in_model(skeleton(NestedBlocksModel), path)
    assert str(path) in str(info.value)


def test_no_public_name_is_shadowed_by_a_submodule():
    # importing bigload/<x>.py sets the package attribute <x>: a public function named like a
    # submodule (bigload.load once was) would turn into that module
    script = ("import importlib, pkgutil, types, bigload\n"
              "for m in pkgutil.iter_modules(bigload.__path__):\n"
              "    importlib.import_module('bigload.' + m.name)\n"
              "bad = [n for n in bigload.__all__ if n not in ('errors',)\n"
              "       and isinstance(getattr(bigload, n), types.ModuleType)]\n"
              "assert not bad, bad\n"
              "assert callable(bigload.load) and callable(bigload.verify)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_public_names_resolve():
    assert callable(bigload.load_checkpoint_in_model)
    assert callable(bigload.load_checkpoint_and_dispatch)
    assert bigload.LoadReport is LoadReport


class HalfInit(nn.Module):
    """reset_parameters() initialises the weight only: a missing bias would stay unset."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4, 4))
        self.bias = nn.Parameter(torch.empty(4))

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class TwoParts(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = HalfInit()


def test_an_initialiser_that_skips_a_missing_tensor_fails_before_anything_loads(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"first.weight": torch.ones(4, 4), "first.bias": torch.zeros(4),
               "second.weight": torch.ones(4, 4)}, path)
    model = skeleton(TwoParts)
    with pytest.raises(NoInitError, match="'second.bias'"):
        load_checkpoint_in_model(model, path, missing="init")
    # no checkpoint tensor was loaded: the failure came first
    assert model.first.weight.device.type == "meta" and model.first.bias.device.type == "meta"
