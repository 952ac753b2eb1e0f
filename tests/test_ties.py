"""Tie groups: found by identity, re-tied, and kept together in user-given device maps."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from bigload.ties import find_tied_parameters, fix_tied_placements, retie_parameters, tie_groups


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
    ("device_map", "expected", "moved"),
    [
        ({"embed": 0, "block": 0, "head": 0}, {"embed": 0, "block": 0, "head": 0}, 0),
        ({"embed": 0, "head": "cuda:0"}, {"embed": 0, "head": "cuda:0"}, 0),
        ({"embed": 0, "head": 1}, {"embed": 0, "head": 0}, 1),
        ({"": "cpu", "head": "disk"}, {"": "cpu", "head": "cpu"}, 1),
        ({"embed": "cpu", "head.weight": 1}, {"embed": "cpu", "head": "cpu"}, 1),
        ({"embed.weight": "disk", "": 0}, {"embed.weight": "disk", "": 0, "head": "disk"}, 1),
    ],
)
def test_fix_tied_placements(device_map, expected, moved, caplog):
    original = dict(device_map)
    with caplog.at_level(logging.WARNING, logger="bigload.ties"):
        fixed, messages = fix_tied_placements(device_map, [("embed.weight", "head.weight")])
    assert fixed == expected
    assert device_map == original
    assert len(messages) == moved == len(caplog.records)
    if moved:
        assert "'head.weight'" in messages[0] and "'embed.weight'" in messages[0]


def test_fix_tied_placements_ignores_uncovered_members():
    fixed, messages = fix_tied_placements({"embed": 0}, [("embed.weight", "head.weight")])
    assert fixed == {"embed": 0} and messages == []
