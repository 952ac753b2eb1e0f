"""Model ids from the Hub (a local stand-in, tests/fake_hub.py): a cold cache downloads only the
files the load reads, a warm one requests no weights, ``HF_HUB_OFFLINE=1`` requests nothing,
and what cannot be had is a typed error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

import bigload  # noqa: E402
from bigload.errors import HubError  # noqa: E402
from bigload.hub import needed_files  # noqa: E402
from fake_hub import FakeHub  # noqa: E402
from hf_models import save_tiny_bert  # noqa: E402

IDS = torch.tensor([[1, 7, 9, 3]])
DECOYS = ("pytorch_model.bin", "flax_model.msgpack", "tf_model.h5", "onnx/model.onnx",
          "onnx/config.json", "model.gguf", "README.md")


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """'org/llama': a sharded safetensors llama plus files of other formats; 'org/st': a
    sentence-transformers bi-encoder (Dense, Normalize) with an onnx/ folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    root = tmp_path_factory.mktemp("repos")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "llama", max_shard_size="30KB")
    for name in DECOYS:
        (root / "llama" / name).parent.mkdir(exist_ok=True)
        (root / "llama" / name).write_bytes(b"not for bigload")
    bert = save_tiny_bert(root / "bert")
    SentenceTransformer(modules=[Transformer(str(bert)), Pooling(32), Dense(32, 16), Normalize()],
                        device="cpu").save(str(root / "st"))
    (root / "st" / "onnx").mkdir()
    (root / "st" / "onnx" / "model.onnx").write_bytes(b"onnx")
    return {"org/llama": root / "llama", "org/st": root / "st"}


@pytest.fixture
def hub(repos, tmp_path, monkeypatch):
    """The stand-in Hub as HF_ENDPOINT, online, with an empty cache."""
    server = FakeHub(repos)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    yield server
    server.close()


def llama_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_cold_cache_then_cached_then_offline(hub, repos, monkeypatch):
    model = bigload.load("org/llama", device_map="cpu")
    reference = transformers.LlamaForCausalLM.from_pretrained(repos["org/llama"]).eval()
    torch.testing.assert_close(llama_logits(model), llama_logits(reference), rtol=0, atol=0)
    shards = sorted(f for f in hub.files("org/llama") if f.startswith("model-0"))
    assert len(shards) > 1
    assert sorted(hub.downloads()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors.index.json", *shards])

    hub.requests.clear()  # cached: the listing is asked for, no weight is
    bigload.load("org/llama", device_map="cpu")
    assert hub.downloads() == []
    assert not [path for _, path in hub.requests if path.endswith(".safetensors")]

    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = bigload.load("org/llama", device_map="cpu")
    assert hub.requests == []
    torch.testing.assert_close(llama_logits(offline), llama_logits(reference), rtol=0, atol=0)


def test_sentence_transformers_repository_fetches_its_modules_not_other_backends(hub, repos):
    from sentence_transformers import SentenceTransformer

    model = bigload.load("org/st", device_map="cpu")
    assert type(model) is SentenceTransformer
    downloaded = set(hub.downloads())
    assert {"modules.json", "1_Pooling/config.json", "2_Dense/model.safetensors",
            "model.safetensors", "tokenizer.json"} <= downloaded
    assert not {f for f in downloaded if f.startswith("onnx/") or f == "README.md"}
    assert {path.split("/resolve/")[0] for _, path in hub.requests} == {
        "/api/models/org/st", "/org/st"}  # the listing and files: the library asks nothing
    reference = SentenceTransformer(str(repos["org/st"]), device="cpu")
    torch.testing.assert_close(model.encode(["a cat"], convert_to_tensor=True),
                               reference.encode(["a cat"], convert_to_tensor=True))


def test_revision_by_commit_and_unknown_revisions(hub):
    commit = hub.commits["org/llama"]
    model = bigload.load("org/llama", device_map="cpu", revision=commit)
    assert commit in Path(model.bigload_report.checkpoint).parts  # the commit's snapshot
    with pytest.raises(HubError, match="revision 'v9' is not in 'org/llama'"):
        bigload.load("org/llama", revision="v9")


def test_missing_repository_and_offline_without_cache_are_typed_errors(hub, monkeypatch):
    with pytest.raises(HubError, match="'org/absent' is not a model repository"):
        bigload.load("org/absent")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="'org/llama' is not in the Hugging Face cache.*"
                                       "HF_HUB_OFFLINE"):
        bigload.load("org/llama")
    assert not [r for r in hub.requests if "org/llama" in r[1]]


def test_needed_files_prefers_safetensors_and_honours_subfolder():
    shards = {"weight_map": {"a": "sub/model-1.safetensors", "b": "sub/model-2.safetensors"}}
    listing = ["config.json", "model.safetensors", "pytorch_model.bin", "sub/config.json",
               "sub/model.safetensors.index.json", "sub/model-1.safetensors",
               "sub/model-2.safetensors", "sub/consolidated.safetensors", "sub/tokenizer.json",
               "sub/modeling_x.py", "sub/model.onnx"]
    read = {"sub/model.safetensors.index.json": {"weight_map": {
        k: v.removeprefix("sub/") for k, v in shards["weight_map"].items()}}}
    assert needed_files(listing, read_json=read.__getitem__) == [
        "config.json", "model.safetensors"]
    assert needed_files(listing, subfolder="sub", read_json=read.__getitem__) == [
        "sub/config.json", "sub/tokenizer.json", "sub/model.safetensors.index.json",
        "sub/model-1.safetensors", "sub/model-2.safetensors"]
    assert "sub/modeling_x.py" in needed_files(listing, subfolder="sub", trust_remote_code=True,
                                               read_json=read.__getitem__)
    assert needed_files(["config.json", "pytorch_model.bin", "flax_model.msgpack"],
                        read_json=read.__getitem__) == ["config.json", "pytorch_model.bin"]
