"""sentence-transformers folders load as the library's own objects, their transformers models
loaded by bigload: folders saved by the installed sentence-transformers (a bi-encoder with Dense
and Normalize, a CrossEncoder, a SparseEncoder) and the real all-MiniLM-L6-v2 give the library's
in-RAM results with part of the transformer on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

import bigload  # noqa: E402
from bigload.errors import DispatchError, UnsupportedArgumentError  # noqa: E402
from hf_models import save_tiny_bert  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog", "cats sat on a dog", "mat"]
PAIRS = [("the cat", "a cat sat on the mat"), ("dog", "mat"), ("the mat", "cats")]
DISK = {"cpu": "50KB", "disk": "1GB"}  # the tiny models (~85 KB) end partly on disk
@pytest.fixture(scope="module")
def bi_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Transformer → Pooling → Dense → Normalize, saved by sentence-transformers itself."""
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    root = tmp_path_factory.mktemp("st")
    bert = save_tiny_bert(root / "bert")
    torch.manual_seed(1)
    model = st.SentenceTransformer(
        modules=[Transformer(str(bert)), Pooling(32), Dense(32, 16), Normalize()], device="cpu")
    model.save(str(root / "bi"))
    return root / "bi"


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ce")
    bert = save_tiny_bert(root / "bert", "BertForSequenceClassification", num_labels=1)
    st.CrossEncoder(str(bert), device="cpu").save(str(root / "ce"))
    return root / "ce"


def test_bi_encoder_with_dense_and_normalize_equals_the_library_with_part_on_disk(bi_encoder):
    types = [m["type"] for m in json.loads((bi_encoder / "modules.json").read_text())]
    assert types[0] == "sentence_transformers.base.modules.transformer.Transformer"  # new paths
    model = bigload.load(bi_encoder, max_memory=DISK)
    assert type(model) is st.SentenceTransformer
    backbone = model[0].auto_model
    assert model.bigload_plan is backbone.bigload_plan
    assert {u.placement for u in model.bigload_plan.units} == {"cpu", "disk"}
    assert not any(p.device.type == "meta" for p in model.parameters())
    reference = st.SentenceTransformer(str(bi_encoder), device="cpu")
    got = model.encode(TEXTS, convert_to_tensor=True)
    want = reference.encode(TEXTS, convert_to_tensor=True)
    assert got.shape == (len(TEXTS), 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.similarity(got, got), reference.similarity(want, want))


def test_cross_encoder_predicts_as_the_library_with_part_on_disk(cross_encoder):
    model = bigload.load(cross_encoder, max_memory=DISK)
    assert type(model) is st.CrossEncoder
    assert "disk" in {u.placement for u in model.bigload_plan.units}
    assert type(model[0].auto_model).__name__ == "BertForSequenceClassification"
    reference = st.CrossEncoder(str(cross_encoder), device="cpu")
    torch.testing.assert_close(torch.as_tensor(model.predict(PAIRS)),
                               torch.as_tensor(reference.predict(PAIRS)), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")  # the library's own
def test_sparse_encoder_equals_the_library(tmp_path):
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    mlm = save_tiny_bert(tmp_path / "mlm", "BertForMaskedLM")
    reference = st.SparseEncoder(
        modules=[Transformer(str(mlm), transformer_task="fill-mask"),
                 SpladePooling("max")], device="cpu")
    reference.save(str(tmp_path / "sparse"))
    model = bigload.load(tmp_path / "sparse", max_memory=DISK)
    assert type(model) is st.SparseEncoder and "disk" in model.bigload_report.bytes_per_device
    got = model.encode(TEXTS, convert_to_tensor=True).to_dense()
    torch.testing.assert_close(got, reference.encode(TEXTS, convert_to_tensor=True).to_dense(),
                               rtol=0, atol=1e-6)


def test_all_minilm_l6_v2_equals_sentence_transformers(default_model_path):
    model = bigload.load(default_model_path, max_memory={"cpu": "70MB", "disk": "1GB"})
    assert "disk" in {u.placement for u in model.bigload_plan.units}
    reference = st.SentenceTransformer(str(default_model_path), device="cpu")
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "Tax law."]
    torch.testing.assert_close(model.encode(texts, convert_to_tensor=True),
                               reference.encode(texts, convert_to_tensor=True),
                               rtol=0, atol=1e-5)


def test_moving_the_whole_model_keeps_the_offload(bi_encoder):
    model = bigload.load(bi_encoder, max_memory=DISK)
    before = model.encode(TEXTS, convert_to_tensor=True)
    pointers = [p.data_ptr() for p in model[0].auto_model.parameters()]
    model.to("cpu")  # reaches the dispatched model through nn.Module._apply: a no-op there
    assert [p.data_ptr() for p in model[0].auto_model.parameters()] == pointers
    torch.testing.assert_close(model.encode(TEXTS, convert_to_tensor=True), before)
    with pytest.raises(DispatchError, match="float16"):
        model.half()  # would copy the disk weights into memory


def test_class_arguments_reach_the_library_and_transformers_classes_load_alone(
        bi_encoder, default_model_path):
    model = bigload.load(bi_encoder, device_map="cpu", prompts={"query": "query: "},
                         truncate_dim=8, no_split_module_classes=["BertLayer"])
    assert model.prompts["query"] == "query: " and model.truncate_dim == 8
    assert model.encode(TEXTS[:1], prompt_name="query").shape == (1, 8)
    bare = bigload.load(default_model_path, device_map="cpu", model_class="BertModel")
    assert type(bare).__name__ == "BertModel" and bare.bigload_report.loaded


def test_arguments_bigload_sets_or_does_not_know_are_refused_with_the_reason(bi_encoder):
    with pytest.raises(UnsupportedArgumentError, match="device.*device_map="):
        bigload.load(bi_encoder, device="cuda")
    with pytest.raises(UnsupportedArgumentError, match="prompt_names.*It takes:.*truncate_dim"):
        bigload.load(bi_encoder, prompt_names={"q": "x"})


def test_plan_and_verify_find_the_transformer_behind_the_new_module_paths(bi_encoder):
    from bigload import hf

    model, index, _config = hf.build_model_skeleton(bi_encoder)  # bigload plan / verify
    assert type(model).__name__ == "BertModel" and hf.verify_model(model, index).ok
