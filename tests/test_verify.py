"""Pre-flight checks: every problem between a model and a checkpoint found from the headers, one
error for all of them, and the model untouched (every parameter still on ``meta``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bigload import init_empty_weights, load_checkpoint_in_model
from bigload.checkpoint import CheckpointReader
from bigload.errors import CheckpointMismatchError, MissingWeightsError, SkeletonError
from bigload.plan import plan_from_device_map
from bigload.preflight import verify
from conftest import (
    BatchNormModel,
    IntBufferModel,
    NestedBlocksModel,
    RotaryModel,
    TiedModel,
    rotary_inv_freq,
)

MIXED_MAP = {"embed": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "disk",
             "norm": "cpu"}


def skeleton(cls: type[nn.Module], **kwargs) -> nn.Module:
    with init_empty_weights():
        return cls(**kwargs)


def all_meta(model: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())


def save(state: dict[str, torch.Tensor], path) -> str:
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.fixture
def nested_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return NestedBlocksModel().state_dict()


@pytest.fixture
def no_reads(monkeypatch):
    """Counts tensor reads: a pre-flight failure must happen before any byte is read."""
    calls: list[str] = []
    real = CheckpointReader.get

    def spy(self, name):
        calls.append(name)
        return real(self, name)

    monkeypatch.setattr(CheckpointReader, "get", spy)
    return calls


# --- missing ------------------------------------------------------------------------------------

def test_missing_lists_every_name_with_shape_and_planned_device(tmp_path, nested_state, no_reads):
    state = dict(nested_state)
    for name in ("norm.weight", "layers.1.mlp.0.bias", "embed.weight"):
        del state[name]
    path = save(state, tmp_path / "model.safetensors")
    model = skeleton(NestedBlocksModel)
    with pytest.raises(MissingWeightsError) as info:
        load_checkpoint_in_model(model, path, device_map=MIXED_MAP)
    message = str(info.value)
    assert "'norm.weight'" in message and "shape=(8,)" in message
    assert "'embed.weight'" in message and "shape=(8, 8)" in message
    assert "'layers.1.mlp.0.bias'" in message and "shape=(16,)" in message
    lines = {line.split()[0]: line for line in message.splitlines() if line.startswith("  '")}
    assert "planned for disk" in lines["'layers.1.mlp.0.bias'"]
    assert "planned for cpu" in lines["'norm.weight'"]
    assert "missing='init'" in message  # the way out
    assert len(info.value.problems) == 3
    assert all_meta(model)
    assert no_reads == []


def test_missing_error_keeps_every_name_past_the_first_ten(tmp_path):
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(8))

    torch.manual_seed(0)
    state = {"layers.0.weight": Wide().layers[0].weight}  # 15 of 16 tensors missing
    path = save(state, tmp_path / "model.safetensors")
    model = skeleton(Wide)
    with pytest.raises(MissingWeightsError, match="and 5 more") as info:
        load_checkpoint_in_model(model, path)
    problems = " ".join(map(str, info.value.problems))
    for i in range(8):
        assert f"'layers.{i}.bias'" in problems
    assert all_meta(model)


# --- unexpected ---------------------------------------------------------------------------------

def test_unexpected_warns_by_default_and_loads(tmp_path, nested_state, caplog):
    path = save({**nested_state, "extra.weight": torch.ones(2)}, tmp_path / "model.safetensors")
    model = skeleton(NestedBlocksModel)
    with caplog.at_level(logging.WARNING, logger="bigload"):
        report = load_checkpoint_in_model(model, path)
    assert report.unexpected == ["extra.weight"]
    assert any("extra.weight" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    eager = NestedBlocksModel()
    eager.load_state_dict(nested_state)
    x = torch.randn(3, 8)
    assert torch.equal(model(x), eager(x))


def test_unexpected_error_raises_before_anything_loads(tmp_path, nested_state, no_reads):
    path = save({**nested_state, "extra.weight": torch.ones(2)}, tmp_path / "model.safetensors")
    model = skeleton(NestedBlocksModel)
    with pytest.raises(CheckpointMismatchError, match="'extra.weight'.*not in the model"):
        load_checkpoint_in_model(model, path, unexpected="error")
    assert all_meta(model)
    assert no_reads == []


# --- shapes and dtype categories ----------------------------------------------------------------

def test_shape_mismatch_names_fqn_and_both_shapes(tmp_path, nested_state, no_reads):
    path = save({**nested_state, "embed.weight": torch.zeros(4, 8)}, tmp_path / "m.safetensors")
    model = skeleton(NestedBlocksModel)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_in_model(model, path)
    assert not isinstance(info.value, MissingWeightsError)
    message = str(info.value)
    assert "'embed.weight'" in message and "(8, 8)" in message and "(4, 8)" in message
    assert all_meta(model)
    assert no_reads == []


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        pytest.param("position_ids", torch.arange(5.0), id="int-buffer-as-float"),
        pytest.param("fc.weight", torch.ones(5, 5, dtype=torch.int64), id="float-param-as-int"),
        pytest.param("mask", torch.ones(5, dtype=torch.int64), id="bool-buffer-as-int"),
    ],
)
def test_float_int_category_change_is_refused(tmp_path, name, stored):
    torch.manual_seed(0)
    state = {**IntBufferModel().state_dict(), name: stored}
    path = save(state, tmp_path / "model.safetensors")
    with init_empty_weights(include_buffers=True):
        model = IntBufferModel()
    with pytest.raises(CheckpointMismatchError, match=f"'{name}'.*dtype"):
        load_checkpoint_in_model(model, path)
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}


def test_float_to_float_is_a_cast_not_a_problem(tmp_path, nested_state):
    path = save({k: v.half() for k, v in nested_state.items()}, tmp_path / "model.safetensors")
    report = verify(skeleton(NestedBlocksModel), path)
    assert report.ok
    assert report.dtype_mismatches == ()


def test_every_kind_of_problem_in_one_error(tmp_path, nested_state, no_reads):
    state = dict(nested_state)
    del state["norm.bias"]
    state["embed.bias"] = torch.zeros(3)
    state["stray"] = torch.zeros(1)
    path = save(state, tmp_path / "model.safetensors")
    model = skeleton(NestedBlocksModel)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_in_model(model, path, unexpected="error")
    message = str(info.value)
    assert "'norm.bias'" in message and "missing" in message
    assert "'embed.bias'" in message and "(8,)" in message and "(3,)" in message
    assert "'stray'" in message
    assert len(info.value.problems) == 3
    assert message.count("Nothing was loaded") == 1
    assert all_meta(model) and no_reads == []


# --- ties and non-persistent buffers ------------------------------------------------------------

def test_tie_group_stored_once_is_complete(tmp_path, tied_model):
    state = {"embed.weight": tied_model.embed.weight}  # no head.weight: it is the same tensor
    path = save(state, tmp_path / "model.safetensors")
    model = skeleton(TiedModel)
    report = verify(model, path)
    assert report.ok and report.missing == ()
    assert ("embed.weight", "head.weight") in report.tied
    load = load_checkpoint_in_model(model, path)
    assert model.head.weight is model.embed.weight
    assert ("embed.weight", "head.weight") in load.tied
    eager = TiedModel()
    eager.load_state_dict(state, strict=False)
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(model(ids), eager(ids))


def test_tie_group_stored_under_the_alias_is_complete(tmp_path, tied_model):
    path = save({"head.weight": tied_model.embed.weight}, tmp_path / "model.safetensors")
    model = skeleton(TiedModel)
    report = load_checkpoint_in_model(model, path, unexpected="error")
    assert report.unexpected == []
    assert torch.equal(model.embed.weight, tied_model.embed.weight)
    assert model.head.weight is model.embed.weight


def test_tie_group_stored_twice_with_the_same_values_is_silent(tmp_path, tied_model, caplog):
    path = tmp_path / "pytorch_model.bin"
    torch.save(tied_model.state_dict(), path)  # both names, one storage
    model = skeleton(TiedModel)
    with caplog.at_level(logging.WARNING, logger="bigload"):
        report = load_checkpoint_in_model(model, path, unexpected="error")
    assert report.unexpected == [] and not caplog.records
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(model(ids), tied_model(ids))


def test_tie_group_stored_twice_with_different_values_is_reported(tmp_path, caplog):
    path = tmp_path / "model.safetensors"
    save_file({"embed.weight": torch.ones(16, 8), "head.weight": torch.full((16, 8), 2.0)}, path)
    model = skeleton(TiedModel)
    with caplog.at_level(logging.WARNING, logger="bigload"):
        try:
            load_checkpoint_in_model(model, path, unexpected="error")
        except CheckpointMismatchError as err:
            assert "'head.weight'" in str(err)
            return
    assert any("head.weight" in r.getMessage() for r in caplog.records)
    # untied (as transformers does): each member keeps its own checkpoint value, nothing dropped
    assert model.head.weight is not model.embed.weight
    assert torch.equal(model.embed.weight, torch.ones(16, 8))
    assert torch.equal(model.head.weight, torch.full((16, 8), 2.0))


def test_tie_group_stored_twice_with_equal_values_stays_tied(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"embed.weight": torch.ones(16, 8), "head.weight": torch.ones(16, 8)}, path)
    model = skeleton(TiedModel)
    load_checkpoint_in_model(model, path, unexpected="error")
    assert model.head.weight is model.embed.weight


def test_non_persistent_buffer_is_never_expected(tmp_path, rotary_model):
    path = save(rotary_model.state_dict(), tmp_path / "model.safetensors")
    assert "inv_freq" not in rotary_model.state_dict()
    model = skeleton(RotaryModel)
    report = load_checkpoint_in_model(model, path)
    assert report.initialized == {}
    torch.testing.assert_close(model.inv_freq, rotary_inv_freq(8), rtol=0, atol=1e-7)


def test_checkpoint_holding_an_inv_freq_is_not_unexpected(tmp_path, rotary_model, caplog):
    state = {**rotary_model.state_dict(), "inv_freq": torch.full((4,), 99.0)}
    path = save(state, tmp_path / "model.safetensors")
    model = skeleton(RotaryModel)
    with caplog.at_level(logging.WARNING, logger="bigload"):
        report = load_checkpoint_in_model(model, path, unexpected="error")
    assert report.unexpected == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # the module's own value, never the stale one from the file
    torch.testing.assert_close(model.inv_freq, rotary_inv_freq(8), rtol=0, atol=1e-7)
    x = torch.randn(2, 8)
    assert torch.equal(model(x), rotary_model(x))


def test_meta_non_persistent_buffer_is_a_skeleton_error(tmp_path, rotary_model):
    path = save(rotary_model.state_dict(), tmp_path / "model.safetensors")
    with torch.device("meta"):  # torch's context puts inv_freq on meta too
        model = RotaryModel()
    with pytest.raises(SkeletonError, match="'inv_freq'.*\n.*init_empty_weights"):
        load_checkpoint_in_model(model, path)
    assert all_meta(model)


def test_real_buffers_missing_from_the_checkpoint_are_kept_and_reported(tmp_path):
    torch.manual_seed(0)
    eager = BatchNormModel()
    state = {k: v for k, v in eager.state_dict().items() if k.startswith("fc.") or
             k in ("bn.weight", "bn.bias")}
    path = save(state, tmp_path / "model.safetensors")
    model = skeleton(BatchNormModel)  # buffers real: running stats at their reset values
    report = load_checkpoint_in_model(model, path)
    assert set(report.kept) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert report.initialized == {}
    model.eval(), eager.eval()
    x = torch.randn(4, 6)
    assert torch.equal(model(x), eager(x))


# --- verify() itself ----------------------------------------------------------------------------

def test_verify_reads_no_tensor_data_and_changes_nothing(tmp_path, nested_state, no_reads):
    state = dict(nested_state)
    del state["norm.weight"]
    path = save({**state, "extra": torch.zeros(1)}, tmp_path / "model.safetensors")
    model = skeleton(NestedBlocksModel)
    report = verify(model, path, plan=plan_from_device_map(model, MIXED_MAP))
    assert not report.ok
    assert report.missing == ("norm.weight",)
    assert report.unexpected == ("extra",)
    assert len(report.key_for) == len(nested_state) - 1
    assert no_reads == [] and all_meta(model)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["missing"] == ["norm.weight"] and data["unexpected"] == ["extra"]
    text = str(report)
    assert "'norm.weight'" in text and "planned for cpu" in text


def test_verify_of_a_clean_checkpoint_is_ok(tmp_path, nested_state):
    path = save(nested_state, tmp_path / "model.safetensors")
    report = verify(skeleton(NestedBlocksModel), path)
    assert report.ok
    assert dict(report.key_for) == {k: k for k in nested_state}
    assert report.prefix_change is None


def test_public_verify_is_the_function_after_the_loader_is_imported():
    script = ("import types, bigload, bigload.loader, bigload.preflight\n"
              "from bigload import verify\n"
              "assert not isinstance(verify, types.ModuleType), verify\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
