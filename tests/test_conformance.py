"""Conformance with transformers: ``bigload.load`` of a sharded tiny model, split over CPU and
disk, computes what transformers' own ``from_pretrained`` computes.

One test per row of ``hf_models.MODELS`` (decoder-only, encoder-only, encoder-decoder, vision,
speech; tied and untied). Each saves a seeded tiny model in several shards, loads it with a CPU
budget of half its bytes (raised where the planner must also keep room on the CPU to run the
largest offloaded block), so that both "cpu" and "disk" are used, and checks: the plan uses
both tiers, nothing is left on meta, every tensor was loaded from the checkpoint (or tied), the
outputs equal the reference's, and for causal LMs greedy generation gives the same tokens.
The fast subset runs by default; the rest with ``-m slow``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_models import AUDIO, BY_NAME, CAUSAL, ENCODER, MODELS, SEQ2SEQ, VISION, WHISPER, HFModel

transformers = pytest.importorskip("transformers")

from bigload import load as bigload_load  # noqa: E402
from bigload.checkpoint import open_reader, read_index  # noqa: E402
from bigload.errors import CheckpointMismatchError, DoesNotFitError  # noqa: E402
from bigload.hf import build_skeleton  # noqa: E402
from bigload.hf_conversions import converted_index, plan_conversions  # noqa: E402
from bigload.keys import apply_key_map  # noqa: E402
from bigload.plan import plan_devices  # noqa: E402
from bigload.preflight import verify  # noqa: E402

SEED = 1234
MIN_SHARDS = 3
RTOL = ATOL = 1e-5


def _param(entry: HFModel) -> pytest.param:
    marks = [] if entry.fast else [pytest.mark.slow]
    return pytest.param(entry, id=entry.name, marks=marks)


# --- building, saving, inputs -------------------------------------------------------------------
def build_model(entry: HFModel) -> torch.nn.Module:
    config = getattr(transformers, entry.config)(**entry.kwargs)
    config.architectures = [entry.model]
    torch.manual_seed(SEED)
    model = getattr(transformers, entry.model)(config)
    return model.eval()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct persistent tensors (ties counted once)."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def split_budget(model: torch.nn.Module, fraction: float) -> int:
    """A CPU budget that makes the planner split ``model`` over CPU and disk: ``fraction`` of
    its bytes, raised in steps where the CPU must also keep room to run the offloaded blocks
    (tiny models have few, relatively big blocks). Planned as bigload.load plans."""
    total = model_bytes(model)
    no_split = list(getattr(model, "_no_split_modules", None) or []) or None
    budget = int(total * fraction)
    while budget < 2 * total:
        try:
            plan = plan_devices(model, max_memory={"cpu": budget, "disk": "1GB"},
                                no_split_module_classes=no_split)
        except DoesNotFitError:
            plan = None
        if plan is not None and splits(planned_bytes(model, plan)):
            return budget
        budget += max(1, total // 20)
    raise AssertionError(f"no CPU budget splits {type(model).__name__} over cpu and disk")


def planned_bytes(model: torch.nn.Module, plan) -> dict[str, int]:  # noqa: ANN001
    """Bytes of the model's persistent tensors per placement (what the LoadReport counts; the
    plan also counts non-persistent buffers, e.g. a causal mask alone on the CPU)."""
    out: dict[str, int] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        where = str(plan.placement_of(name))
        out[where] = out.get(where, 0) + tensor.numel() * tensor.element_size()
    return out


def splits(bytes_per_device) -> bool:  # noqa: ANN001
    """Both tiers hold bytes (a plan lists devices that only got empty modules too)."""
    return bytes_per_device.get("cpu", 0) > 0 and bytes_per_device.get("disk", 0) > 0


def save_sharded(model: torch.nn.Module, folder) -> int:  # noqa: ANN001
    """Save in at least MIN_SHARDS shards; returns the number of shard files."""
    shard = max(4096, model_bytes(model) // (MIN_SHARDS + 3))
    model.save_pretrained(folder, max_shard_size=shard)
    return len(list(folder.glob("*.safetensors")))


def make_inputs(entry: HFModel, config) -> dict[str, torch.Tensor]:  # noqa: ANN001
    g = torch.Generator().manual_seed(SEED)
    vocab = getattr(config, "vocab_size", 128)

    def ids(batch: int, length: int) -> torch.Tensor:
        return torch.randint(3, vocab, (batch, length), generator=g)

    if entry.kind in (CAUSAL, ENCODER):
        return {"input_ids": ids(2, 8)}
    if entry.kind == SEQ2SEQ:
        return {"input_ids": ids(2, 8), "decoder_input_ids": ids(2, 5)}
    if entry.kind == VISION:
        size = config.image_size
        return {"pixel_values": torch.randn(2, config.num_channels, size, size, generator=g)}
    if entry.kind == WHISPER:
        frames = 2 * config.max_source_positions
        return {"input_features": torch.randn(2, config.num_mel_bins, frames, generator=g),
                "decoder_input_ids": ids(2, 5)}
    if entry.kind == AUDIO:
        return {"input_values": torch.randn(2, 400, generator=g)}
    raise AssertionError(f"unknown kind {entry.kind!r}")


def main_output(outputs) -> torch.Tensor:  # noqa: ANN001
    for name in ("logits", "last_hidden_state"):
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no logits or last_hidden_state in {type(outputs).__name__}")


# --- the test ------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", [_param(m) for m in MODELS])
def test_conformance(entry: HFModel, tmp_path):
    folder, offload = tmp_path / "model", tmp_path / "offload"
    original = build_model(entry)
    budget = split_budget(original, entry.cpu_fraction)
    assert save_sharded(original, folder) >= MIN_SHARDS
    del original

    reference = getattr(transformers, entry.auto).from_pretrained(folder).eval()
    assert type(reference).__name__ == entry.model

    model = bigload_load(folder, max_memory={"cpu": budget, "disk": "1GB"},
                         offload_dir=offload, progress=False)
    assert type(model).__name__ == entry.model

    # the plan splits the model over CPU and disk
    assert splits(model.bigload_plan.bytes_per_device), str(model.bigload_plan)
    # every tensor real, every tensor from the checkpoint (or tied to one that is)
    on_meta = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    assert not on_meta, on_meta
    report = model.bigload_report
    assert splits(report.bytes_per_device), str(report)
    assert set(report.initialized) == set(entry.absent), str(report)
    assert report.unexpected == [], report.unexpected
    assert bool(report.tied) == entry.tied, report.tied
    # the same values as transformers' own loader
    ref_state = reference.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=0, msg=name)

    inputs = make_inputs(entry, reference.config)
    with torch.no_grad():
        expected = main_output(reference(**inputs))
        got = main_output(model(**inputs))
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)

    if entry.kind == CAUSAL:
        prompt = inputs["input_ids"][:1]
        settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            want = reference.generate(prompt, **settings)
            have = model.generate(prompt, **settings)
        assert have.shape[1] > prompt.shape[1]
        assert torch.equal(have, want), (have, want)


def test_table_covers_the_brief():
    """At least 25 architectures, every kind, tied and untied, a fast subset of six."""
    names = {m.name for m in MODELS}
    required = {"gpt2", "gpt_bigcode", "llama", "mistral", "mixtral", "qwen2", "gemma", "phi",
                "falcon", "bloom", "opt", "gpt_neox", "t5", "bart", "bert", "roberta",
                "deberta-v2", "distilbert", "vit", "whisper"}
    assert required <= names, required - names
    assert len(names) == len(MODELS) >= 25
    assert {m.kind for m in MODELS} == {CAUSAL, ENCODER, SEQ2SEQ, VISION, WHISPER, AUDIO}
    assert {m.tied for m in MODELS} == {True, False}
    assert {m.name for m in MODELS if m.fast} == {"gpt2", "llama", "mixtral", "t5", "bert", "vit"}


# --- the conversions bigload.load applies (bigload.hf_conversions), from headers only -----------
def saved(name: str, folder) -> tuple[torch.nn.Module, torch.nn.Module, object]:  # noqa: ANN001
    """(eager model, meta skeleton as bigload.load builds it, checkpoint index) of a table row."""
    entry = BY_NAME[name]
    model = build_model(entry)
    save_sharded(model, folder)
    skeleton = build_skeleton(model.config, type(model), torch.float32)
    return model, skeleton, read_index(folder)


def test_fused_experts_are_derived_tensors(tmp_path):
    model, skeleton, index = saved("mixtral", tmp_path)
    conversions = plan_conversions(skeleton, index)
    fused = {f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
             for p in ("gate_up_proj", "down_proj")}
    assert set(conversions.derived) == fused
    assert not conversions.problems
    params = dict(model.named_parameters())
    for name, derived in conversions.derived.items():
        assert derived.shape == tuple(params[name].shape)
        assert all(".block_sparse_moe.experts." in s for s in derived.sources)
    assert len(conversions.derived["model.layers.0.mlp.experts.gate_up_proj"].sources) == 8
    # the router is a plain rename
    renamed = apply_key_map(index.entries, conversions.key_map)
    router = "model.layers.1.mlp.gate.weight"
    assert renamed[router] == "model.layers.1.block_sparse_moe.gate.weight"

    converted = converted_index(index, conversions)
    assert not any(".experts.0." in n for n in converted.entries)
    assert all(converted.entries[n].byte_range is None for n in fused)
    kept = [n for n in converted.entries if n not in fused]
    assert all(converted.entries[n] is index.entries[n] for n in kept)  # still zero-copy
    report = verify(skeleton, converted, key_map=conversions.key_map)
    assert report.ok, str(report)
    with open_reader(converted) as reader:
        for name in fused:
            assert torch.equal(reader.get(name), params[name].detach()), name
        assert reader.get(kept[0]).data_ptr() != 0


def test_one_fused_tensor_split_in_two_is_read_once(tmp_path):
    model, skeleton, index = saved("dinov2", tmp_path)
    conversions = plan_conversions(skeleton, index)
    gate, up = "encoder.layer.0.mlp.gate_proj.weight", "encoder.layer.0.mlp.up_proj.weight"
    assert conversions.derived[gate].sources == conversions.derived[up].sources
    assert conversions.derived[gate].group == conversions.derived[up].group
    params = dict(model.named_parameters())
    with open_reader(converted_index(index, conversions)) as reader:
        reads = []
        base_get = reader.base.get
        reader.base.get = lambda name: reads.append(name) or base_get(name)
        assert torch.equal(reader.get(up), params[up].detach())
        assert torch.equal(reader.get(gate), params[gate].detach())
    assert reads == list(conversions.derived[gate].sources)


@pytest.mark.parametrize("name", ["vit", "swin", "gpt_neox"])
def test_renames_are_an_exact_key_map(name, tmp_path):
    _, skeleton, index = saved(name, tmp_path)
    conversions = plan_conversions(skeleton, index)
    assert conversions.key_map and not conversions.derived
    model_names = set(skeleton.state_dict())
    renamed = apply_key_map(index.entries, conversions.key_map)
    for new, old in renamed.items():
        assert new in model_names or old not in conversions.renamed, (old, new)
    assert set(conversions.renamed.values()) <= set(renamed)
    # layer numbers generalised: fewer rules than renamed tensors
    layered = [k for k in conversions.renamed if ".0." in k or ".1." in k]
    assert not layered or len(conversions.key_map) < len(conversions.renamed)


def test_chained_renames_fall_back_to_exact_rules():
    from bigload.hf_conversions import _key_map

    renames = {"a.norm0.weight": "a.norm1.weight", "a.norm1.weight": "a.norm2.weight"}
    rules = _key_map(renames, ["b.weight"])
    got = apply_key_map([*renames, "b.weight"], rules)
    assert got == {"a.norm1.weight": "a.norm0.weight", "a.norm2.weight": "a.norm1.weight",
                   "b.weight": "b.weight"}


def test_a_conversion_that_cannot_be_planned_is_refused(tmp_path, monkeypatch):
    from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming

    from bigload import hf_conversions

    class Opaque(ConversionOps):
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):  # noqa: ANN001
            raise NotImplementedError("needs the data")

    _, skeleton, index = saved("mixtral", tmp_path)
    tools = hf_conversions._transformers_tools()
    opaque = WeightConverter(".experts.*.w2.weight", ".experts.down_proj", operations=[Opaque()])
    mapping = [WeightRenaming(".block_sparse_moe.", ".mlp."), opaque]
    monkeypatch.setattr(hf_conversions, "_transformers_tools", lambda: dataclasses.replace(
        tools, get_model_conversion_mapping=lambda model: mapping))
    conversions = plan_conversions(skeleton, index)
    assert len(conversions.problems) == 2 and "needs the data" in conversions.problems[0]
    with pytest.raises(CheckpointMismatchError, match="cannot plan"):
        hf_conversions.prepare_checkpoint(skeleton, index)
