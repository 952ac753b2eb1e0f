"""Matching checkpoint keys to model names: a detected prefix change (DataParallel's ``module.``, a
``model.`` wrapper, a base model into a task model and back), explicit ``key_map`` renames, and a
clear error where the match is ambiguous."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bigload import init_empty_weights, load_checkpoint_in_model
from bigload.errors import CheckpointMismatchError, MissingWeightsError
from bigload.keys import apply_key_map, match_keys
from conftest import NestedBlocksModel, TwinLinearsModel, WrappedNestedModel


def skeleton(cls, *args, **kwargs) -> nn.Module:
    with init_empty_weights():
        return cls(*args, **kwargs)


def all_meta(model: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())


@pytest.fixture
def eager_nested() -> NestedBlocksModel:
    torch.manual_seed(3)
    return NestedBlocksModel().eval()


def assert_same_outputs(model: nn.Module, eager: nn.Module) -> None:
    x = torch.randn(3, 8)
    assert torch.equal(model(x), eager(x))


# --- detected prefix changes --------------------------------------------------------------------

def test_dataparallel_module_prefix_is_stripped_and_logged(tmp_path, eager_nested, caplog):
    path = tmp_path / "model.safetensors"
    save_file(nn.DataParallel(eager_nested).state_dict(), path)
    assert next(iter(load_file(path))).startswith("module.")
    model = skeleton(NestedBlocksModel)
    with caplog.at_level(logging.INFO, logger="bigload"):
        report = load_checkpoint_in_model(model, path, unexpected="error")
    assert report.prefix_change == "stripped 'module.'"
    assert any("module." in r.getMessage() for r in caplog.records)
    assert "module." in str(report)
    assert_same_outputs(model, eager_nested)


def test_wrapper_checkpoint_into_the_inner_model(tmp_path, eager_nested):
    wrapper = WrappedNestedModel()
    wrapper.model = eager_nested
    path = tmp_path / "model.safetensors"
    save_file(wrapper.state_dict(), path)
    model = skeleton(NestedBlocksModel)
    report = load_checkpoint_in_model(model, path, unexpected="error")
    assert report.prefix_change == "stripped 'model.'"
    assert_same_outputs(model, eager_nested)


def test_inner_checkpoint_into_the_wrapper(tmp_path, eager_nested):
    path = tmp_path / "model.safetensors"
    save_file(eager_nested.state_dict(), path)
    model = skeleton(WrappedNestedModel)
    report = load_checkpoint_in_model(model, path, unexpected="error")
    assert report.prefix_change == "added 'model.'"
    assert_same_outputs(model, eager_nested)


# --- transformers: a base model's checkpoint into a task model and back -------------------------

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64, num_labels=3,
    )
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(root / "base")
    torch.manual_seed(1)
    transformers.BertForSequenceClassification(config).save_pretrained(root / "task")
    return transformers, config, root


def _bert_ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def test_bert_base_checkpoint_into_task_model_needs_a_missing_policy(bert):
    transformers, config, root = bert
    model = skeleton(transformers.BertForSequenceClassification, config)
    with pytest.raises(MissingWeightsError) as info:
        load_checkpoint_in_model(model, root / "base")
    message = str(info.value)
    assert "'classifier.weight'" in message and "'classifier.bias'" in message
    assert "bert.embeddings" not in message  # the prefix change matched everything else
    assert all_meta(model)


def test_bert_base_checkpoint_into_task_model_with_init(bert, caplog):
    transformers, config, root = bert
    model = skeleton(transformers.BertForSequenceClassification, config)
    with caplog.at_level(logging.INFO, logger="bigload"):
        report = load_checkpoint_in_model(model, root / "base", missing="init")
    assert report.prefix_change == "added 'bert.'"
    assert any("added 'bert.'" in r.getMessage() for r in caplog.records)
    assert set(report.initialized) == {"classifier.weight", "classifier.bias"}
    assert report.unexpected == []
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    eager = transformers.BertModel(config).eval()
    eager.load_state_dict(load_file(root / "base" / "model.safetensors"))
    ids = _bert_ids()
    model.eval()
    assert torch.equal(model.bert(ids).last_hidden_state, eager(ids).last_hidden_state)


def test_bert_task_checkpoint_into_base_model_has_classifier_unexpected(bert, caplog):
    transformers, config, root = bert
    model = skeleton(transformers.BertModel, config)
    with caplog.at_level(logging.WARNING, logger="bigload"):
        report = load_checkpoint_in_model(model, root / "task")
    assert report.prefix_change == "stripped 'bert.'"
    assert sorted(report.unexpected) == ["classifier.bias", "classifier.weight"]
    assert any("classifier.weight" in r.getMessage() for r in caplog.records)
    eager = transformers.BertForSequenceClassification(config).eval()
    eager.load_state_dict(load_file(root / "task" / "model.safetensors"))
    ids = _bert_ids()
    model.eval()
    assert torch.equal(model(ids).last_hidden_state, eager.bert(ids).last_hidden_state)


def test_bert_task_checkpoint_into_base_model_unexpected_error(bert):
    transformers, config, root = bert
    model = skeleton(transformers.BertModel, config)
    with pytest.raises(CheckpointMismatchError, match="'classifier.weight'"):
        load_checkpoint_in_model(model, root / "task", unexpected="error")
    assert all_meta(model)


# --- ambiguous matches and key_map --------------------------------------------------------------

def test_ambiguous_prefix_errors_with_both_sides_and_a_key_map_hint(tmp_path, caplog):
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file(nn.Linear(4, 4).state_dict(), path)
    model = skeleton(TwinLinearsModel)
    with caplog.at_level(logging.WARNING, logger="bigload"), \
            pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_in_model(model, path)
    message = str(info.value)
    for name in ("'enc.weight'", "'enc.bias'", "'dec.weight'", "'dec.bias'"):
        assert name in message  # the model side
    assert "'bias'" in message or "'weight'" in message  # the checkpoint side
    assert "key_map" in message
    assert any("prefix" in r.getMessage() for r in caplog.records)
    assert all_meta(model)


def test_ambiguous_prefix_with_unexpected_error_lists_both_sides_in_full(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file(nn.Linear(4, 4).state_dict(), path)
    model = skeleton(TwinLinearsModel)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_in_model(model, path, unexpected="error")
    problems = " ".join(map(str, info.value.problems))
    for name in ("'enc.weight'", "'dec.bias'", "'weight'", "'bias'"):
        assert name in problems
    assert len(info.value.problems) == 6


def test_key_map_resolves_the_ambiguity(tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(4, 4)
    path = tmp_path / "model.safetensors"
    save_file(linear.state_dict(), path)
    model = skeleton(TwinLinearsModel)
    report = load_checkpoint_in_model(model, path, key_map={r"^": "dec."}, missing="zeros")
    assert sorted(report.loaded) == ["dec.bias", "dec.weight"]
    assert set(report.initialized) == {"enc.weight", "enc.bias"}
    x = torch.randn(2, 4)
    assert torch.equal(model.dec(x), linear(x))
    assert torch.equal(model.enc.weight, torch.zeros(4, 4))


def test_key_map_renames_blocks(tmp_path, eager_nested):
    state = {k.replace("layers.", "blocks.").replace("mlp.", "ffn."): v
             for k, v in eager_nested.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    model = skeleton(NestedBlocksModel)
    with pytest.raises(MissingWeightsError, match="key_map"):
        load_checkpoint_in_model(model, path)
    report = load_checkpoint_in_model(
        model, path, key_map={r"^blocks\.": "layers.", r"\.ffn\.": ".mlp."}, unexpected="error"
    )
    assert len(report.loaded) == len(state)
    assert_same_outputs(model, eager_nested)


def test_legacy_gamma_beta_names_load_into_layernorm(tmp_path):
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))

    torch.manual_seed(0)
    eager = build()
    nn.init.normal_(eager[1].weight)
    nn.init.normal_(eager[1].bias)
    state = {k.replace("1.weight", "1.gamma").replace("1.bias", "1.beta"): v
             for k, v in eager.state_dict().items()}
    assert "1.gamma" in state
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    model = skeleton(build)
    report = load_checkpoint_in_model(model, path, unexpected="error")
    assert sorted(report.loaded) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    x = torch.randn(2, 6)
    assert torch.equal(model(x), eager(x))


# --- the pure functions -------------------------------------------------------------------------

def test_apply_key_map_is_regex_to_replacement_in_order():
    renamed = apply_key_map(["encoder.0.w", "head.w"], {r"^encoder\.": "layers.", r"\.w$": ".x"})
    assert renamed == {"layers.0.x": "encoder.0.w", "head.x": "head.w"}
    assert apply_key_map(["a"], None) == {"a": "a"}


@pytest.mark.parametrize(
    ("model_keys", "ckpt_keys", "change"),
    [
        pytest.param(["a.w", "b.w"], ["a.w", "b.w"], None, id="identity"),
        pytest.param(["a.w", "b.w"], ["module.a.w", "module.b.w"], "stripped 'module.'",
                     id="strip"),
        pytest.param(["bert.a.w", "bert.b.w", "head.w"], ["a.w", "b.w"], "added 'bert.'",
                     id="add"),
        pytest.param(["x.w", "y.w"], ["w"], None, id="ambiguous"),
    ],
)
def test_match_keys_table(model_keys, ckpt_keys, change):
    match = match_keys(model_keys, ckpt_keys)
    assert match.prefix_change == change
    for model_name, key in match.model_to_ckpt.items():
        assert model_name in model_keys and key in ckpt_keys
    if change is None and model_keys == ckpt_keys:
        assert dict(match.model_to_ckpt) == {k: k for k in model_keys}
    if change is not None:
        assert len(match.model_to_ckpt) == len(ckpt_keys)


def test_an_exact_match_beats_a_prefix_change():
    match = match_keys(["a.w", "module.a.w"], ["module.a.w"])
    assert match.prefix_change is None
    assert dict(match.model_to_ckpt) == {"module.a.w": "module.a.w"}
