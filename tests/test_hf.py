"""bigload.load's edges: model ids from the local Hugging Face cache (offline), errors for paths
that are not model folders, the progress bar, the transformers initialisers skipped on meta, and
load options reaching the model inside a sentence-transformers folder."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

import bigload  # noqa: E402
from bigload.errors import HubError, ModelResolveError  # noqa: E402
from bigload.hf import build_skeleton  # noqa: E402


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)
    config.architectures = ["LlamaForCausalLM"]
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding 'org/tiny' (one snapshot, refs/main), as the hub writes it."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    tiny_llama().save_pretrained(snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_model_id_resolves_offline_from_the_hub_cache(hub_cache):
    model = bigload.load("org/tiny", device_map="cpu")
    reference = transformers.LlamaForCausalLM.from_pretrained(hub_cache).eval()
    ids = torch.tensor([[1, 7, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_model_id_missing_from_the_cache_offline_says_why_nothing_is_downloaded(hub_cache):
    with pytest.raises(HubError, match="'org/absent' is not in the Hugging Face cache.*"
                                       "HF_HUB_OFFLINE is set"):
        bigload.load("org/absent")


def test_folder_without_config_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelResolveError, match="no config.json.*load_checkpoint_and_dispatch"):
        bigload.load(tmp_path)


def test_progress_bar_on_stderr_when_asked(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path)
    bigload.load(tmp_path, device_map="cpu", progress=True)
    err = capsys.readouterr().err
    assert "loading" in err and "B" in err  # a tqdm bar over bytes
    bigload.load(tmp_path, device_map="cpu", progress=False)
    assert "loading" not in capsys.readouterr().err


def test_skeleton_skips_initialisers_on_meta_but_keeps_real_buffers_right():
    eager = tiny_llama()
    config = eager.config
    model = build_skeleton(config, transformers.LlamaForCausalLM, torch.float32)
    assert all(p.device.type == "meta" for p in model.parameters())
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu"
    torch.testing.assert_close(inv_freq, eager.model.rotary_emb.inv_freq, rtol=0, atol=0)
    # transformers' own initialisers are restored afterwards
    from transformers import initialization

    assert initialization.TORCH_INIT_FUNCTIONS["normal_"] is torch.nn.init.normal_


def test_sentence_folder_honours_every_load_option(default_model_path):
    # the options reach the transformers model that sentence-transformers asks for
    model = bigload.load(default_model_path, max_memory={"cpu": "30MB", "disk": "1GB"},
                         dtype=torch.bfloat16, no_split_module_classes=[], prefetch=0,
                         headroom_bytes="1MiB")
    backbone = model[0].auto_model
    assert backbone.dtype == torch.bfloat16 and model.bigload_plan is backbone.bigload_plan
    assert any(u.name.startswith("encoder.layer.0.") for u in model.bigload_plan.units)
    assert "headroom for activations on cpu when offloading: 1.0 MiB" in model.bigload_plan.notes
    assert model.encode(["a sentence"]).shape == (1, 384)
