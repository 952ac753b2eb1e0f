"""bigload.load takes what from_pretrained takes: each argument honoured (compared with
transformers' own load) or refused with a typed error that says why."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import bigload  # noqa: E402
from bigload.errors import (  # noqa: E402
    CheckpointMismatchError,
    DoesNotFitError,
    ModelResolveError,
    RemoteCodeError,
    UnsupportedArgumentError,
)

IDS = torch.tensor([[1, 7, 9, 3, 5]])


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT sequence classifier with 3 labels."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    folder = tmp_path_factory.mktemp("classifier")
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def eager(folder: Path, cls: str = "LlamaForCausalLM", **kwargs: object) -> torch.nn.Module:
    return getattr(transformers, cls).from_pretrained(folder, **kwargs).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# --- config overrides, ignore_mismatched_sizes -------------------------------------------------
def test_config_attributes_are_overrides_as_in_from_pretrained(llama_folder):
    model = bigload.load(llama_folder, device_map="cpu", rms_norm_eps=0.5)
    assert model.config.rms_norm_eps == 0.5
    torch.testing.assert_close(logits(model), logits(eager(llama_folder, rms_norm_eps=0.5)))
    assert not torch.allclose(logits(model), logits(eager(llama_folder)))


def test_unknown_arguments_are_refused_listing_the_accepted_ones(llama_folder):
    with pytest.raises(UnsupportedArgumentError, match="num_labelz.*It takes:.*headroom_bytes.*"
                       "ignore_mismatched_sizes.*any attribute of the model's config"):
        bigload.load(llama_folder, num_labelz=2)


def test_refused_from_pretrained_arguments_say_why(llama_folder):
    with pytest.raises(UnsupportedArgumentError, match="quantization_config.*unquantised"):
        bigload.load(llama_folder, quantization_config={"load_in_8bit": True})
    with pytest.raises(UnsupportedArgumentError, match="output_loading_info.*bigload_report"):
        bigload.load(llama_folder, output_loading_info=True)
    bigload.load(llama_folder, device_map="cpu", low_cpu_mem_usage=True, use_safetensors=True)


def test_a_new_head_on_disk_is_initialised_with_ignore_mismatched_sizes(classifier_folder,
                                                                        caplog):
    with pytest.raises(CheckpointMismatchError, match="(?s)classifier.weight.*"
                       "ignore_mismatched_sizes=True"):
        bigload.load(classifier_folder, num_labels=2)
    with caplog.at_level(logging.WARNING, logger="bigload.hf"):
        model = bigload.load(classifier_folder, num_labels=2, ignore_mismatched_sizes=True,
                             device_map={"": "cpu", "classifier": "disk"})
    assert {u.placement for u in model.bigload_plan.units if u.name.startswith("classifier")} \
        == {"disk"}
    assert set(model.bigload_report.initialized) == {"classifier.weight", "classifier.bias"}
    assert "'classifier.weight': checkpoint (3, 32), model (2, 32)" in caplog.text
    reference = eager(classifier_folder, "BertForSequenceClassification", num_labels=2,
                      ignore_mismatched_sizes=True)
    with torch.no_grad():
        got = model(IDS, output_hidden_states=True)
        want = reference(IDS, output_hidden_states=True)
    assert got.logits.shape == (1, 2) and torch.isfinite(got.logits).all()
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --- the model class ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_class", [
    transformers.AutoModelForSequenceClassification, "AutoModelForSequenceClassification",
    transformers.BertForSequenceClassification, "BertForSequenceClassification",
    "text-classification",
])
def test_model_class_takes_classes_names_auto_classes_and_tasks(classifier_folder, model_class):
    model = bigload.load(classifier_folder, device_map="cpu", model_class=model_class)
    assert type(model) is transformers.BertForSequenceClassification


def test_model_class_that_names_nothing_lists_the_tasks(classifier_folder):
    with pytest.raises(ModelResolveError, match="'sentiment'.*causal-lm.*text-classification"):
        bigload.load(classifier_folder, model_class="sentiment")


# --- dtype, attention, keys, folders -----------------------------------------------------------
def test_torch_dtype_is_the_old_name_of_dtype(llama_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="bigload.hf_args"):
        model = bigload.load(llama_folder, device_map="cpu", torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and "`torch_dtype` is deprecated" in caplog.text
    with pytest.raises(UnsupportedArgumentError, match="both dtype=.*torch_dtype="):
        bigload.load(llama_folder, dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_attn_implementation_is_honoured(llama_folder):
    model = bigload.load(llama_folder, device_map="cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(logits(model),
                               logits(eager(llama_folder, attn_implementation="eager")))


def test_key_mapping_renames_checkpoint_keys(llama_folder, tmp_path):
    renamed = {k.replace("model.layers.", "model.blocks."): v
               for k, v in load_file(llama_folder / "model.safetensors").items()}
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((llama_folder / "config.json").read_text())
    model = bigload.load(tmp_path, device_map="cpu", missing="error",
                         key_mapping={r"^model\.blocks\.": "model.layers."})
    torch.testing.assert_close(logits(model), logits(eager(llama_folder)))


def test_subfolder_and_local_revision(llama_folder, tmp_path):
    (tmp_path / "sub").symlink_to(llama_folder, target_is_directory=True)
    model = bigload.load(tmp_path, device_map="cpu", subfolder="sub", revision="main")
    torch.testing.assert_close(logits(model), logits(eager(llama_folder)))
    with pytest.raises(UnsupportedArgumentError, match="revision='v2'.*local folder"):
        bigload.load(llama_folder, revision="v2")


REMOTE_CONFIG = '''from transformers import PretrainedConfig


class RemoteTinyConfig(PretrainedConfig):
    model_type = "bigload-remote-tiny"

    def __init__(self, width=8, **kwargs):
        self.width = width
        super().__init__(**kwargs)
'''
REMOTE_MODEL = '''import torch
from transformers import PreTrainedModel

from .configuration_remote_tiny import RemoteTinyConfig


class RemoteTinyModel(PreTrainedModel):
    config_class = RemoteTinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, x):
        return self.proj(x).tanh()
'''


def test_remote_code_runs_only_with_trust_remote_code(tmp_path):
    (tmp_path / "configuration_remote_tiny.py").write_text(REMOTE_CONFIG)
    (tmp_path / "modeling_remote_tiny.py").write_text(REMOTE_MODEL)
    (tmp_path / "config.json").write_text(
        '{"model_type": "bigload-remote-tiny", "width": 8, "architectures": ["RemoteTinyModel"],'
        ' "auto_map": {"AutoConfig": "configuration_remote_tiny.RemoteTinyConfig",'
        ' "AutoModel": "modeling_remote_tiny.RemoteTinyModel"}}')
    torch.manual_seed(0)
    save_file({"proj.weight": torch.randn(8, 8), "proj.bias": torch.randn(8)},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    for trust in (None, False):
        with pytest.raises(RemoteCodeError, match="auto_map|AutoConfig.*trust_remote_code=True"):
            bigload.load(tmp_path, trust_remote_code=trust)
    model = bigload.load(tmp_path, device_map="cpu", trust_remote_code=True)
    reference = transformers.AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    x = torch.randn(2, 8)
    assert type(model).__name__ == "RemoteTinyModel"
    torch.testing.assert_close(model(x), reference(x))


# --- planning arguments the planner's own messages suggest ------------------------------------
def test_the_planners_suggestions_are_arguments_of_load(llama_folder):
    with pytest.raises(DoesNotFitError) as caught:
        bigload.load(llama_folder, max_memory={"cpu": "2KB", "disk": "1GB"}, prefetch=0)
    advice = re.sub(r"'[^']*'", "", str(caught.value))  # quoted names are the model's units
    suggested = set(re.findall(r"\b([a-z]+(?:_[a-z]+)+)\b", advice))
    assert {"headroom_bytes", "offload_buffers", "max_memory"} <= suggested
    parameters = inspect.signature(bigload.load).parameters
    assert suggested <= set(parameters), suggested - set(parameters)


def test_headroom_and_offload_buffers_reach_the_plan(llama_folder):
    budget = {"cpu": "60KB", "disk": "1GB"}
    plain = bigload.load(llama_folder, max_memory=budget, prefetch=0).bigload_plan
    roomy = bigload.load(llama_folder, max_memory=budget, prefetch=0,
                         headroom_bytes="4KB", offload_buffers=True).bigload_plan
    assert not plain.offload_buffers and roomy.offload_buffers
    assert "headroom for activations on cpu when offloading: 3.9 KiB" in "\n".join(roomy.notes)
    assert roomy.reserve_bytes > plain.reserve_bytes


# --- saying what happened ----------------------------------------------------------------------
def test_initialised_weights_are_logged_by_name(llama_folder, tmp_path, caplog):
    state = load_file(llama_folder / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((llama_folder / "config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="bigload.hf"):
        model = bigload.load(tmp_path, device_map="cpu")
    assert "'model.norm.weight': init: LlamaForCausalLM._init_weights" in caplog.text
    assert list(model.bigload_report.initialized) == ["model.norm.weight"]


def test_bin_checkpoint_on_disk_converts_into_a_temporary_folder(llama_folder, tmp_path, caplog):
    reference = eager(llama_folder)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((llama_folder / "config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="bigload.hf"):
        model = bigload.load(tmp_path, max_memory={"cpu": "60KB", "disk": "1GB"}, prefetch=0)
    folder = Path(model.bigload_report.offload_folder)
    assert folder.is_dir() and folder.parent.name.startswith("bigload-offload-")
    assert f"converted into {folder}" in caplog.text and "torch .bin" in caplog.text
    torch.testing.assert_close(logits(model), logits(reference))


def test_the_accepted_names_are_the_arguments_of_load():
    parameters = inspect.signature(bigload.load).parameters
    keyword_only = [n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert list(bigload.hf.ACCEPTED_ARGUMENTS) == keyword_only


def test_a_broken_config_is_a_typed_error_naming_the_file(llama_folder, tmp_path):
    import shutil

    from bigload.errors import ModelResolveError

    broken = tmp_path / "broken"
    shutil.copytree(llama_folder, broken)
    (broken / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelResolveError, match=r"config.json' is not valid JSON"):
        bigload.load(broken)
    (broken / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(ModelResolveError, match="model_type 'no-such-model'"):
        bigload.load(broken)


def test_a_plan_for_another_machine_is_refused_before_loading(llama_folder):
    from bigload.errors import DeviceError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="cuda:0.*cannot run here"):
        bigload.load(llama_folder, max_memory={0: "1GB", "cpu": "1GB"})
