"""Sizes: dtype-aware bytes per tensor and module, ties counted once, checkpoint shapes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bigload.errors import DtypeError
from bigload.sizes import (
    compute_module_sizes,
    dtype_nbytes,
    sizes_from_index,
    tensor_nbytes,
    tensor_sizes,
)


class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)


def tied() -> nn.Module:
    with torch.device("meta"):
        model = nn.ModuleDict({"embed": nn.Embedding(8, 4), "head": nn.Linear(4, 8, bias=False)})
    model["head"].weight = model["embed"].weight
    return model


@pytest.mark.parametrize(
    ("dtype", "nbytes"),
    [
        (torch.float32, 4),
        (torch.float16, 2),
        ("bfloat16", 2),
        ("torch.int64", 8),
        (torch.bool, 1),
        (torch.float8_e4m3fn, 1),
        (torch.uint4, 0.5),
    ],
)
def test_dtype_nbytes(dtype, nbytes):
    assert dtype_nbytes(dtype) == nbytes


def test_tensor_nbytes_of_shape_and_tensor():
    assert tensor_nbytes((3, 5), torch.float16) == 30
    assert tensor_nbytes((3,), torch.uint4) == 2  # rounded up to whole bytes
    assert tensor_nbytes(torch.empty(2, 2, device="meta")) == 16
    assert tensor_nbytes(torch.empty(2, 2, device="meta"), torch.bfloat16) == 8


def test_bad_dtype_names_the_dtype():
    with pytest.raises(DtypeError, match="'float99'"):
        dtype_nbytes("float99")


def test_module_sizes_match_accelerate_without_ties():
    with torch.device("meta"):
        model = nn.Sequential(Norm(), Norm())
    accelerate = pytest.importorskip("accelerate.utils.modeling")
    ours = compute_module_sizes(model)
    theirs = accelerate.compute_module_sizes(model)
    assert {k: v for k, v in ours.items() if k in theirs} == dict(theirs)
    assert ours[""] == 2 * (16 * 4 + 4 * 4 + 4 * 4 * 4 + 8)


def test_floats_at_dtype_ints_at_their_own():
    with torch.device("meta"):
        model = Norm()
    sizes = compute_module_sizes(model, dtype=torch.float16)
    assert sizes["fc.weight"] == 32
    assert sizes["bn.num_batches_tracked"] == 8  # int64 stays int64
    assert sizes["bn"] == 4 * 4 * 2 + 8


def test_tied_tensor_counted_once_alias_zero():
    sizes = compute_module_sizes(tied())
    assert sizes[""] == 8 * 4 * 4
    assert sizes["embed.weight"] == 128
    assert sizes["head.weight"] == 0
    assert sizes["head"] == 0


def test_buffers_only():
    with torch.device("meta"):
        model = Norm()
    assert compute_module_sizes(model, buffers_only=True)[""] == 4 * 4 * 2 + 8


def test_every_module_listed_even_without_tensors():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert compute_module_sizes(model)["1"] == 0


def test_keep_in_fp32_and_special_dtypes():
    with torch.device("meta"):
        model = Norm()
    entries = tensor_sizes(model, dtype=torch.float16, keep_in_fp32_modules=["bn"])
    by_name = {e.fqns[0]: e.size_bytes for e in entries}
    assert by_name["bn.weight"] == 16 and by_name["fc.weight"] == 32
    special = tensor_sizes(model, dtype=torch.float16, special_dtypes={"fc.weight": torch.float64})
    assert {e.fqns[0]: e.size_bytes for e in special}["fc.weight"] == 128


def test_overrides_replace_model_shapes_for_any_tie_member():
    entries = tensor_sizes(tied(), overrides={"head.weight": 1000})
    assert [(e.fqns, e.size_bytes) for e in entries] == [(("embed.weight", "head.weight"), 1000)]


@pytest.mark.parametrize(
    "index",
    [
        {"a": ((2, 3), torch.float32), "b": ((4,), torch.int64)},
        {"a": SimpleNamespace(shape=(2, 3), dtype=torch.float32), "b": ((4,), "int64")},
        SimpleNamespace(entries={"a": SimpleNamespace(shape=(2, 3), dtype=torch.float32),
                                 "b": SimpleNamespace(shape=(4,), dtype=torch.int64)}),
    ],
)
def test_sizes_from_index(index):
    assert sizes_from_index(index) == {"a": 24, "b": 32}
    assert sizes_from_index(index, dtype=torch.bfloat16) == {"a": 12, "b": 32}
