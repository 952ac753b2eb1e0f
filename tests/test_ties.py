"""Tie groups: found by identity, re-tied, and kept together in user-given device maps."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from bigload.plan import plan_from_device_map
from bigload.ties import find_tied_parameters, retie_parameters, tie_groups


class Shared(nn.Module):
    """Embedding tied to the head, a shared submodule, and a buffer registered twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.block = nn.Linear(4, 4)
        self.again = self.block
        self.head = nn.Linear(4, 8, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(4))
        self.block.register_buffer("scale", self.scale)


@pytest.fixture
def model() -> nn.Module:
    with torch.device("meta"):
        return Shared()


def test_tie_groups_in_model_order_with_buffers(model):
    assert tie_groups(model) == [  # module by module, the root's own tensors first
        ("scale", "block.scale", "again.scale"),
        ("embed.weight", "head.weight"),
        ("block.weight", "again.weight"),
        ("block.bias", "again.bias"),
    ]


def test_find_tied_parameters_matches_accelerate(model):
    accelerate = pytest.importorskip("accelerate.utils.modeling")
    ours = find_tied_parameters(model)
    assert ours == sorted(sorted(g) for g in accelerate.find_tied_parameters(model))
    assert ours == [["again.bias", "block.bias"], ["again.weight", "block.weight"],
                    ["embed.weight", "head.weight"]]


def test_retie_parameters_restores_identity(model):
    model.head.weight = nn.Parameter(torch.empty(8, 4, device="meta"))
    model.embed.weight = nn.Parameter(torch.zeros(8, 4))
    retie_parameters(model, [["embed.weight", "head.weight"]])
    assert model.head.weight is model.embed.weight


@pytest.mark.parametrize(
    ("device_map", "home", "warned"),
    [
        ({"": 0}, "cuda:0", 0),
        ({"": 0, "head": "cuda:0"}, "cuda:0", 0),
        ({"": 0, "head": 1}, "cuda:0", 1),
        ({"": "cpu", "head": "disk"}, "cpu", 1),
        ({"": "cpu", "head.weight": 1}, "cpu", 1),
        ({"embed.weight": "disk", "": 0}, "disk", 1),
    ],
)
def test_a_tie_split_by_a_device_map_lives_with_its_first_member(
    model, device_map, home, warned, caplog
):
    with caplog.at_level(logging.WARNING, logger="bigload.plan"):
        plan = plan_from_device_map(model, device_map, check_available=False)
    assert str(plan.placement_of("head.weight")) == home
    assert str(plan.placement_of("embed.weight")) == home
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == warned
    if warned:
        assert "'head.weight'" in messages[0] and "'embed.weight'" in messages[0]
