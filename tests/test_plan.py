"""Known plans on meta-built models (budgets in bytes, GPUs as keys 0, 1, ... without GPUs)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import transformers
from torch import nn

from bigload.compat.accelerate import (
    check_device_map,
    clean_device_map,
    get_balanced_memory,
    get_max_memory,
    infer_auto_device_map,
)
from bigload.errors import DeviceMapError, DoesNotFitError, SizeError
from bigload.plan import DevicePlan, PlannedUnit
from bigload.plan import plan_devices as _plan_devices

# the known plans below reserve room for the one offloaded unit that runs, none fetched ahead
plan_devices = functools.partial(_plan_devices, prefetch=0)

W = 8  # every Linear(W, W, bias=False) and Embedding(W, W) holds 256 bytes in fp32
BIG = 10**6


class Block(nn.Module):
    def __init__(self, buffer: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(W, W, bias=False)
        self.act = nn.ReLU()
        if buffer:
            self.register_buffer("scale", torch.ones(W * W))


class Net(nn.Module):
    """embed (256) + blocks (n × 256) + head (256); ``tie`` shares embed and head weights."""

    def __init__(self, blocks: int = 8, tie: bool = False, buffers: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(W, W)
        self.blocks = nn.ModuleList(Block(buffers) for _ in range(blocks))
        self.head = nn.Linear(W, W, bias=False)
        if tie:
            self.head.weight = self.embed.weight


class BufNet(nn.Module):
    """Blocks of 512 bytes, half of them a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(buffer=True) for _ in range(8))


class Vit(nn.Module):
    """A root parameter (cls_token) next to blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(W * W))
        self.blocks = nn.ModuleList(Block() for _ in range(4))


def meta(cls=Net, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return cls(**kwargs)


def names(*items: str) -> list[str]:
    return [f"blocks.{i}" if i.isdigit() else i for i in items]


def mapping(**by_device: list[str]) -> dict[str, str]:
    result = {}
    for device, members in by_device.items():
        for name in members:
            result[name] = device.replace("_", ":")
    return result


KNOWN = [
    pytest.param(
        {}, {0: 3000}, {"": "cuda:0"}, id="whole-model-on-gpu0"
    ),
    pytest.param(
        {"strategy": "sequential"}, {0: 1024, 1: 2048},
        mapping(cuda_0=names("embed", "0", "1", "2"),
                cuda_1=names("3", "4", "5", "6", "7", "head")),
        id="sequential-two-gpus",
    ),
    pytest.param(
        {}, {0: BIG, 1: BIG},
        mapping(cuda_0=names("embed", "0", "1", "2", "3", "4"),
                cuda_1=names("5", "6", "7", "head")),
        id="balanced-two-gpus",
    ),
    pytest.param(
        {"strategy": "sequential"}, {0: BIG, 1: BIG}, {"": "cuda:0"}, id="sequential-fits-gpu0"
    ),
    pytest.param(
        {"strategy": "balanced_low_0"}, {0: BIG, 1: BIG, 2: BIG},
        mapping(cuda_1=names("embed", "0", "1", "2", "3", "4"),
                cuda_2=names("5", "6", "7", "head")),
        id="balanced-low-0",
    ),
    pytest.param(
        {}, {0: 1024, "cpu": BIG},
        mapping(cuda_0=names("embed", "0", "1"), cpu=names("2", "3", "4", "5", "6", "7", "head")),
        id="reserve-for-largest-offloaded",
    ),
    pytest.param(
        {}, {0: 768, "cpu": 512},
        mapping(cuda_0=names("embed", "0"), cpu=names("1", "2"),
                disk=names("3", "4", "5", "6", "7", "head")),
        id="gpu-cpu-disk",
    ),
    pytest.param(
        {}, {"cpu": 1024},
        mapping(cpu=names("embed", "0", "1"), disk=names("2", "3", "4", "5", "6", "7", "head")),
        id="cpu-only-to-disk",
    ),
    pytest.param(
        {"headroom_bytes": 256}, {0: 1024, "cpu": BIG},
        mapping(cuda_0=names("embed", "0"), cpu=names("1", "2", "3", "4", "5", "6", "7", "head")),
        id="headroom",
    ),
    pytest.param(
        {"headroom_bytes": None}, {0: 1024, "cpu": BIG},
        mapping(cuda_0=names("embed", "0"), cpu=names("1", "2", "3", "4", "5", "6", "7", "head")),
        id="default-headroom-5-percent",
    ),
    pytest.param(
        {"dtype": torch.float16}, {0: 1280, "cpu": BIG}, {"": "cuda:0"}, id="dtype-halves"
    ),
    pytest.param(
        {"model": meta(tie=True, blocks=4), "strategy": "sequential"}, {0: 768, 1: 4096},
        mapping(cuda_0=names("embed", "0", "1", "head"), cuda_1=names("2", "3")),
        id="tie-group-on-first-device",
    ),
    pytest.param(
        {"model": meta(BufNet)}, {0: 3072, "cpu": BIG},
        mapping(cuda_0=names("0", "1"), cpu=names("2", "3", "4", "5", "6", "7")),
        id="buffers-of-offloaded-count-on-gpu0",
    ),
    pytest.param(
        {"model": meta(BufNet), "offload_buffers": True}, {0: 3072, "cpu": BIG},
        mapping(cuda_0=names("0", "1", "2", "3", "4"), cpu=names("5", "6", "7")),
        id="offload-buffers",
    ),
    pytest.param(
        {"model": meta(Vit)}, {0: 768, "cpu": BIG},
        mapping(cuda_0=names("cls_token", "0"), cpu=names("1", "2", "3")),
        id="root-parameter-is-a-unit",
    ),
    pytest.param(
        {"tensor_sizes": {"blocks.0.fc.weight": 5000}}, {0: 5600, "cpu": BIG},
        mapping(cuda_0=names("embed", "0"), cpu=names("1", "2", "3", "4", "5", "6", "7", "head")),
        id="checkpoint-sizes-override",
    ),
    pytest.param(
        {"index": {"blocks.0.fc.weight": ((1250, 1), torch.float32)}}, {0: 5600, "cpu": BIG},
        mapping(cuda_0=names("embed", "0"), cpu=names("1", "2", "3", "4", "5", "6", "7", "head")),
        id="checkpoint-index-shapes",
    ),
]


@pytest.mark.parametrize(("kwargs", "max_memory", "expected"), KNOWN)
def test_known_plans(kwargs, max_memory, expected):
    kwargs = {"headroom_bytes": 0, **kwargs}
    model = kwargs.pop("model", None) or meta()
    plan = plan_devices(model, max_memory=max_memory, **kwargs)
    assert {u.name: u.placement for u in plan.units} == expected


def test_reasons_name_the_decision():
    plan = plan_devices(meta(tie=True), max_memory={0: 1024, "cpu": BIG}, headroom_bytes=0)
    reasons = {u.name: u.reason for u in plan.units}
    assert "tie group" in reasons["head"] and "'embed'" in reasons["head"]
    assert "no-split" in reasons["blocks.0"]
    assert "reserve" in reasons["blocks.2"]
    assert plan.reserve_bytes == 256 and plan.main_device == "cuda:0"


def test_llama_from_config_ties_and_no_split():
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    budgets = {0: 200_000, 1: 300_000, 2: 300_000}
    plan = plan_devices(model, max_memory=budgets, strategy="sequential", headroom_bytes=0)
    assert plan.placement_of("lm_head.weight") == plan.placement_of("model.embed_tokens.weight")
    assert {u.name: u.placement for u in plan.units} == {
        "model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0",
        "model.layers.1": "cuda:1", "model.layers.2": "cuda:1", "model.layers.3": "cuda:2",
        "model.norm": "cuda:2", "model.rotary_emb": "cuda:2", "lm_head": "cuda:0",
    }
    assert "LlamaDecoderLayer" in {u.name: u.reason for u in plan.units}["model.layers.2"]


def test_unknown_no_split_class_is_logged(caplog):
    plan_devices(meta(), max_memory={0: 4096}, no_split_module_classes=["Blok"])
    assert "Blok matches no module of Net" in caplog.text


def test_repeated_blocks_kept_whole_and_logged(caplog):
    with caplog.at_level("INFO", logger="bigload.plan"):
        plan = plan_devices(meta(), max_memory={0: 1024, "cpu": BIG}, headroom_bytes=0)
    assert "children of 'blocks'" in caplog.text
    assert "blocks.0" in {u.name for u in plan.units}


@pytest.mark.parametrize(
    ("classes", "unit", "max_memory"),
    [
        ([], "blocks.0.fc", {0: 1024, "cpu": BIG}),
        (["Block"], "blocks.0", {0: 1024, "cpu": BIG}),
        (Block, "blocks.0", {0: 1024, "cpu": BIG}),
        ("Net", "", {0: 4096}),
    ],
)
def test_no_split_module_classes(classes, unit, max_memory):
    plan = plan_devices(meta(), max_memory=max_memory, headroom_bytes=0,
                        no_split_module_classes=classes)
    assert unit in {u.name for u in plan.units}


def test_default_budgets_plan_on_this_machine():
    plan = plan_devices(meta())
    assert plan.units == (PlannedUnit("", plan.main_device, 2560, plan.units[0].reason),)
    assert "disk" not in plan.budgets and "cpu" in plan.budgets


def test_same_input_same_plan_and_json_round_trip():
    plans = [plan_devices(meta(tie=True), max_memory={0: 768, "cpu": 512}) for _ in range(2)]
    assert plans[0] == plans[1]
    assert DevicePlan.from_json(plans[0].to_json(indent=2)) == plans[0]


def test_plan_accessors():
    plan = plan_devices(meta(), max_memory={0: 768, "cpu": 512}, headroom_bytes=0)
    assert plan.placement_of("blocks.4.fc.weight") == "disk"
    assert plan.placement_of("embed.weight") == torch.device("cuda", 0)
    assert plan.bytes_per_device == {"cuda:0": 512, "cpu": 512, "disk": 1536}
    assert plan.device_map == {
        "embed": torch.device("cuda", 0), "blocks.0": torch.device("cuda", 0),
        "blocks.1": torch.device("cpu"), "blocks.2": torch.device("cpu"),
        "blocks.3": "disk", "blocks.4": "disk", "blocks.5": "disk", "blocks.6": "disk",
        "blocks.7": "disk", "head": "disk",
    }
    assert [u.name for u in plan.offloaded][:2] == ["blocks.1", "blocks.2"]


def test_str_is_a_table_of_devices_in_aligned_columns():
    text = str(plan_devices(meta(tie=True), max_memory={0: 768, "cpu": 512}, headroom_bytes=0))
    lines = text.splitlines()
    assert "budgets: cuda:0 768 B (given), cpu 512 B (given), disk unbounded" in lines
    header = lines.index("device  units  planned  reserve     budget  holds")
    assert lines[header + 1] == "cuda:0      2    512 B    256 B      768 B  embed … blocks.0"
    assert lines[header + 3] == "disk        5  1.2 KiB      0 B  unbounded  blocks.3 … blocks.7"
    assert "without bytes of their own (not counted above): head (tied to 'embed')" in lines
    assert "to disk: 5 units, 1.2 KiB" in text
    assert "head → cuda:0: leaf module; tie group: placed with 'embed'" in text


# --- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_memory": {0: 1024, "disk": 0}}, DoesNotFitError, r"short by \d+ bytes"),
        ({"max_memory": {"cpu": 300, "disk": 0}}, DoesNotFitError, "allow disk offload"),
        ({"max_memory": {0: 128, "cpu": BIG}}, DoesNotFitError, "main execution device cuda:0"),
        ({"max_memory": {"cpu": 200}}, DoesNotFitError, "short by 56 bytes"),
        ({"max_memory": {"gpu": 1}}, SizeError, "'gpu'"),
        ({"max_memory": {0: "lots"}}, SizeError, r"max_memory\[0\]"),
        ({"max_memory": ["cpu"]}, SizeError, "mapping"),
        ({"strategy": "greedy"}, DeviceMapError, "'greedy'"),
        ({"headroom_bytes": "a bit"}, SizeError, "headroom_bytes"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        plan_devices(meta(), **kwargs)


def test_does_not_fit_names_the_unit():
    with pytest.raises(DoesNotFitError, match="unit 'blocks.2'"):
        plan_devices(meta(), max_memory={0: 768, "disk": 0}, headroom_bytes=0)


def test_from_json_rejects_other_json():
    with pytest.raises(DeviceMapError, match="not a DevicePlan"):
        DevicePlan.from_json(json.dumps({"units": []}))


def test_check_device_map_names_uncovered_tensors():
    check_device_map(meta(), {"": 0})
    with pytest.raises(DeviceMapError, match="'head.weight' has no device"):
        check_device_map(meta(), {"embed": 0, "blocks": "cpu"})
    with pytest.raises(DeviceMapError, match="'head'"):
        check_device_map(meta(), {"": 0, "head": "moon"})
    with pytest.warns(UserWarning, match="nothing in the model"):
        check_device_map(meta(), {"": 0, "tail": 0})


# --- accelerate-compatible names ----------------------------------------------------------------
@pytest.mark.parametrize(
    "device_map",
    [
        {"a.b": 0, "a.c": 0, "d": 1},
        {"a.b.c": 0, "a.b.d": 0, "a.e": 0, "f": "cpu"},
        {"a.1": 0, "a.10": 1, "a.11": 1, "b": "disk"},
        {"a": 0, "b": 0},
        {"x.y": "cpu"},
    ],
)
def test_clean_device_map_matches_accelerate(device_map):
    accelerate = pytest.importorskip("accelerate.utils.modeling")
    ours = clean_device_map(dict(device_map))
    theirs = accelerate.clean_device_map(dict(device_map))
    assert ours == dict(theirs)


def test_get_max_memory_accelerate_keys():
    assert get_max_memory({"cpu": "500MB", "cuda:1": "1GiB", 0: 10}) == {
        0: 10, 1: 1 << 30, "cpu": 500_000_000,
    }
    assert "cpu" in get_max_memory()


@pytest.mark.parametrize("low_zero", [False, True])
def test_get_balanced_memory_matches_accelerate(low_zero):
    accelerate = pytest.importorskip("accelerate.utils.modeling")
    budgets = {0: BIG, 1: BIG, "cpu": BIG}
    ours = get_balanced_memory(meta(), dict(budgets), ["Block"], low_zero=low_zero)
    theirs = accelerate.get_balanced_memory(meta(), dict(budgets), ["Block"], low_zero=low_zero)
    assert ours == theirs


def test_infer_auto_device_map_result_shape():
    kwargs = {"max_memory": {0: 4096, 1: 4096, "cpu": BIG}, "no_split_module_classes": ["Block"]}
    accelerate = pytest.importorskip("accelerate.utils.modeling")
    ours = infer_auto_device_map(meta(), **kwargs)
    assert ours == dict(accelerate.infer_auto_device_map(meta(), **kwargs))
    offloaded = infer_auto_device_map(meta(), max_memory={0: 768, "cpu": 512})
    assert set(offloaded.values()) == {0, "cpu", "disk"}
    check_device_map(meta(), offloaded)


@pytest.mark.parametrize(
    ("max_memory", "prefetch", "reserve"),
    [
        ({0: 2048, "cpu": BIG}, 0, 256),  # the running unit only
        ({0: 2048, "cpu": BIG}, 2, 768),  # plus two fetched ahead onto the accelerator
        ({"cpu": 1024}, 1, 512),  # on the CPU their pages are mapped ahead of use
    ],
)
def test_reserve_holds_the_units_fetched_ahead(max_memory, prefetch, reserve):
    plan = plan_devices(meta(), max_memory=max_memory, prefetch=prefetch, headroom_bytes=0)
    assert plan.reserve_bytes == reserve
    main = plan.main_device
    on_main = sum(u.size_bytes for u in plan.units if u.placement == main)
    assert on_main + plan.reserve_bytes <= plan.budgets[main]


@pytest.mark.parametrize(("max_memory", "reserve"), [({0: 2048, "cpu": BIG}, 512),
                                                      ({"cpu": 1024}, 512)])
def test_default_prefetch_reserve_holds_one_unit_ahead(max_memory, reserve):
    # prefetch=None is the default: one unit read ahead (into the streaming pool, or copied to
    # the accelerator), on any main device
    plan = plan_devices(meta(), max_memory=max_memory, prefetch=None, headroom_bytes=0)
    assert plan.prefetch == 1 and plan.reserve_bytes == reserve
