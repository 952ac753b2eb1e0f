"""Planner invariants on random small MLP-like meta models and random budgets (hypothesis)."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bigload.devicemap import covering_entry
from bigload.errors import DoesNotFitError
from bigload.plan import STRATEGIES, DevicePlan
from bigload.plan import plan_devices as _plan_devices
from bigload.sizes import compute_module_sizes, named_tensors
from bigload.ties import tie_groups

# the properties hold for any prefetch depth; these inputs were sized for none fetched ahead
plan_devices = functools.partial(_plan_devices, prefetch=0)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Block(nn.Module):
    def __init__(self, width: int, hidden: int, bias: bool, buffer: bool) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden, bias=bias)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, width, bias=bias)
        if buffer:
            self.register_buffer("steps", torch.zeros(hidden, dtype=torch.int64))
            self.register_buffer("scale", torch.ones(width), persistent=False)


class Mlp(nn.Module):
    def __init__(self, spec: dict) -> None:
        super().__init__()
        width, vocab = spec["width"], spec["vocab"]
        if spec["root_param"]:
            self.cls_token = nn.Parameter(torch.zeros(width))
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(
            *(Block(width, h, spec["bias"], spec["buffers"]) for h in spec["hidden"])
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if spec["tie"]:
            self.head.weight = self.embed.weight


model_specs = st.fixed_dictionaries(
    {
        "width": st.integers(1, 16),
        "vocab": st.integers(1, 32),
        "hidden": st.lists(st.integers(1, 32), min_size=1, max_size=6),
        "bias": st.booleans(),
        "buffers": st.booleans(),
        "tie": st.booleans(),
        "root_param": st.booleans(),
    }
)


@st.composite
def plan_inputs(draw):
    spec = draw(model_specs)
    with torch.device("meta"):
        model = Mlp(spec)
    total = compute_module_sizes(model)[""]
    budget = st.integers(total // 5, total + 64) | st.just(0)
    max_memory = {i: draw(budget) for i in range(draw(st.integers(0, 3)))}
    if draw(st.booleans()) or not max_memory:  # budgets that name no memory device are refused
        max_memory["cpu"] = draw(budget)
    disk = draw(st.sampled_from(["unbounded", "off", "bounded"]))
    if disk != "unbounded":
        max_memory["disk"] = 0 if disk == "off" else draw(budget)
    kwargs = {
        "max_memory": max_memory,
        "strategy": draw(st.sampled_from(STRATEGIES)),
        "offload_buffers": draw(st.booleans()),
        "headroom_bytes": draw(st.sampled_from([None, 0, 16, 100])),
        "dtype": draw(st.sampled_from([None, torch.float16])),
        "no_split_module_classes": draw(st.sampled_from([None, [], ["Block"], ["Linear"]])),
    }
    return model, kwargs


def plan_or_none(model, kwargs) -> DevicePlan | None:
    try:
        return plan_devices(model, **kwargs)
    except DoesNotFitError as err:
        if "disk" not in kwargs["max_memory"]:  # unbounded disk: only the main device can fail
            assert "main execution device" in str(err)
        return None


@SETTINGS
@given(plan_inputs())
def test_every_tensor_placed_exactly_once(inputs):
    model, kwargs = inputs
    plan = plan_or_none(model, kwargs)
    if plan is None:
        return
    names = [u.name for u in plan.units]
    assert len(names) == len(set(names))
    for fqn, _tensor, _kind in named_tensors(model):
        covering = [n for n in names if n == "" or fqn == n or fqn.startswith(f"{n}.")]
        assert len(covering) == 1, (fqn, covering)


@SETTINGS
@given(plan_inputs())
def test_no_device_over_budget_and_reserve_kept(inputs):
    model, kwargs = inputs
    plan = plan_or_none(model, kwargs)
    if plan is None:
        return
    used = plan.bytes_per_device
    for placement, size in used.items():
        if placement in plan.budgets:
            assert size <= plan.budgets[placement], placement
    assert sum(used.values()) == compute_module_sizes(model, dtype=kwargs["dtype"])[""]
    if plan.offloaded and plan.main_device in plan.budgets:
        largest = max(u.size_bytes for u in plan.offloaded)
        assert plan.reserve_bytes >= largest
        assert used.get(plan.main_device, 0) + plan.reserve_bytes <= plan.budgets[plan.main_device]


@SETTINGS
@given(plan_inputs())
def test_tie_groups_on_one_device(inputs):
    model, kwargs = inputs
    plan = plan_or_none(model, kwargs)
    if plan is None:
        return
    for group in tie_groups(model):
        assert len({str(plan.placement_of(fqn)) for fqn in group}) == 1, group


@SETTINGS
@given(plan_inputs())
def test_same_input_same_plan_and_json_round_trip(inputs):
    model, kwargs = inputs
    plan = plan_or_none(model, kwargs)
    if plan is None:
        return
    assert plan_devices(model, **kwargs) == plan
    assert DevicePlan.from_json(plan.to_json()) == plan
    device_map = plan.device_map
    for fqn, _tensor, _kind in named_tensors(model):
        assert covering_entry(device_map, fqn)[1] == plan.placement_of(fqn)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_execution_order_is_kept_within_each_tier_sequence(strategy):
    """Tiers are filled in order: once a later tier is used, no earlier tier comes back
    (tie partners excepted, and units filled back from disk into room left over)."""
    with torch.device("meta"):
        model = Mlp({"width": 8, "vocab": 8, "hidden": [16] * 6, "bias": True,
                     "buffers": False, "tie": False, "root_param": False})
    plan = plan_devices(model, max_memory={0: 1200, 1: 1200, "cpu": 1000}, strategy=strategy)
    order = list(plan.budgets) + ["disk"]
    ranks = [order.index(u.placement) for u in plan.units if "filled back" not in u.reason]
    assert ranks == sorted(ranks)
