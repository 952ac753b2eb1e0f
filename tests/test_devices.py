"""Device and size normalisation at the edge: parse_device, parse_size, parse_max_memory."""

from __future__ import annotations

import pytest
import torch

from bigload.devices import (
    DISK,
    accelerator_count,
    accelerator_type,
    format_size,
    free_memory_bytes,
    is_accelerator,
    parse_device,
    parse_dtype,
    parse_max_memory,
    parse_max_memory_text,
    parse_placement,
    parse_size,
    placement_str,
)
from bigload.errors import BigloadError, DeviceError, DtypeError, SizeError

GiB = 1 << 30
CUDA_OR_NONE = pytest.mark.skipif(
    accelerator_type() not in (None, "cuda"), reason="int devices mean another accelerator here"
)
NO_ACCELERATOR = pytest.mark.skipif(
    accelerator_type() is not None, reason="checks the errors of a machine without accelerator"
)


# --- parse_device ------------------------------------------------------------------------------
@CUDA_OR_NONE
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (0, torch.device("cuda", 0)),
        (3, torch.device("cuda", 3)),
        ("1", torch.device("cuda", 1)),
        (" 2 ", torch.device("cuda", 2)),
        ("cuda", torch.device("cuda", 0)),
        ("CUDA:1", torch.device("cuda", 1)),
        (torch.device("cuda"), torch.device("cuda", 0)),
        (torch.device("cuda", 5), torch.device("cuda", 5)),
        ("xpu", torch.device("xpu", 0)),
        ("mps", torch.device("mps", 0)),
        ("cpu", torch.device("cpu")),
        (" CPU ", torch.device("cpu")),
        (torch.device("cpu"), torch.device("cpu")),
        ("meta", torch.device("meta")),
    ],
)
def test_parse_device_without_availability_check(given, expected):
    assert parse_device(given, check_available=False) == expected


def test_parse_device_returns_torch_device():
    result = parse_device("cpu")
    assert isinstance(result, torch.device) and result.index is None


@pytest.mark.parametrize(
    "given", [-1, True, False, 1.0, None, [0], "", "gpu", "tpu", "cuda:x", "disk", "xla", "fpga:0"]
)
def test_parse_device_refuses(given):
    with pytest.raises(DeviceError) as info:
        parse_device(given, check_available=False)
    assert isinstance(info.value, BigloadError) and isinstance(info.value, ValueError)


def test_parse_device_unknown_name_says_what_is_accepted():
    with pytest.raises(DeviceError, match="unknown device 'gpu'.*'cpu', 'cuda:0'"):
        parse_device("gpu")


@NO_ACCELERATOR
@pytest.mark.parametrize(
    ("given", "match"),
    [
        (0, "no cuda device is available"),
        ("cuda:1", "no cuda device is available"),
        ("xpu:0", "no xpu device is available"),
        ("mps", "MPS is not available"),
    ],
)
def test_parse_device_checks_availability(given, match):
    with pytest.raises(DeviceError, match=match):
        parse_device(given)


@NO_ACCELERATOR
def test_no_accelerator_here():
    assert accelerator_type() is None
    assert accelerator_count() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parse_device_index_past_the_last_gpu():
    count = torch.cuda.device_count()
    assert parse_device(0) == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=f"has {count} cuda device"):
        parse_device(count)


# --- placements --------------------------------------------------------------------------------
@pytest.mark.parametrize("given", ["disk", "DISK", " disk "])
def test_parse_placement_accepts_disk(given):
    assert parse_placement(given) == DISK == "disk"


def test_parse_placement_is_parse_device_otherwise():
    assert parse_placement("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError):
        parse_placement("floppy")


@CUDA_OR_NONE
def test_placement_str_and_is_accelerator():
    cuda1 = parse_placement(1, check_available=False)
    assert placement_str(cuda1) == "cuda:1"
    assert placement_str(torch.device("cpu")) == "cpu"
    assert placement_str(DISK) == "disk"
    assert is_accelerator(cuda1)
    assert not is_accelerator(torch.device("cpu"))
    assert not is_accelerator(DISK)


# --- sizes -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("10GiB", 10 * GiB),
        ("10GB", 10 * 1000**3),
        ("1.5GiB", 3 * GiB // 2),
        ("500MB", 500 * 1000**2),
        ("500MiB", 500 * (1 << 20)),
        ("24gib", 24 * GiB),
        (" 8 GiB ", 8 * GiB),
        ("2TB", 2 * 1000**4),
        ("1KiB", 1024),
        ("1kB", 1000),
        ("123", 123),
        ("123B", 123),
        (".5GiB", GiB // 2),
        (0, 0),
        (1024, 1024),
        (10 * GiB, 10 * GiB),
        (1.5e3, 1500),
    ],
)
def test_parse_size(given, expected):
    result = parse_size(given)
    assert result == expected and type(result) is int


@pytest.mark.parametrize(
    "given",
    [
        "",
        "GiB",
        "ten GiB",
        "10XB",
        "10 GiBs",
        "-5GB",
        "1e9",
        "10GiB extra",
        "1,5GiB",
        -1,
        float("nan"),
        float("inf"),
        True,
        None,
        [10],
    ],
)
def test_parse_size_refuses(given):
    with pytest.raises(SizeError):
        parse_size(given)


def test_parse_size_error_names_what_and_examples():
    with pytest.raises(SizeError, match=r"max_memory\['cpu'\]: cannot parse '10XB'.*'10GiB'"):
        parse_size("10XB", what="max_memory['cpu']")


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (10 * GiB, "10.0 GiB")]
)
def test_format_size(size, text):
    assert format_size(size) == text


# --- max_memory --------------------------------------------------------------------------------
@CUDA_OR_NONE
def test_parse_max_memory_normalises_keys_and_values():
    result = parse_max_memory({0: "20GiB", "cuda:1": "10GB", "cpu": "8GiB", "disk": 100 * GiB})
    assert result == {
        torch.device("cuda", 0): 20 * GiB,
        torch.device("cuda", 1): 10 * 1000**3,
        torch.device("cpu"): 8 * GiB,
        "disk": 100 * GiB,
    }
    assert [placement_str(p) for p in result] == ["cuda:0", "cuda:1", "cpu", "disk"]


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({0: "1GiB", "cuda:0": "2GiB"}, "twice"),
        ({"cpu": "1GiB", torch.device("cpu"): "2GiB"}, "twice"),
        ({"meta": "1GiB"}, "meta"),
        ({"gpu": "1GiB"}, "max_memory key 'gpu'"),
        ({"cpu": "lots"}, r"max_memory\['cpu'\]"),
        ({"cpu": -1}, r"max_memory\['cpu'\]"),
        ([("cpu", "1GiB")], "must be a mapping"),
        ("cpu=1GiB", "must be a mapping"),
    ],
)
def test_parse_max_memory_refuses(given, match):
    with pytest.raises(SizeError, match=match):
        parse_max_memory(given)


@CUDA_OR_NONE
def test_parse_max_memory_text():
    result = parse_max_memory_text("0=20GiB,cpu=8GiB,disk=100GiB")
    assert result == {torch.device("cuda", 0): 20 * GiB, torch.device("cpu"): 8 * GiB,
                      "disk": 100 * GiB}
    assert parse_max_memory_text(" cpu = 1GB , disk=2GB, ") == {
        torch.device("cpu"): 10**9,
        "disk": 2 * 10**9,
    }


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0:20GiB", "not KEY=SIZE"),
        ("cpu=", "not KEY=SIZE"),
        ("=8GiB", "not KEY=SIZE"),
        ("cpu=8GiB,cpu=4GiB", "names 'cpu' twice"),  # as the mapping form; was: the later won
        ("cpu=8 apples", "cannot parse"),
    ],
)
def test_parse_max_memory_text_refuses(text, match):
    with pytest.raises(SizeError, match=match):
        parse_max_memory_text(text)


# --- free memory -------------------------------------------------------------------------------
def test_free_memory_of_cpu_is_positive_bytes():
    free = free_memory_bytes(torch.device("cpu"))
    assert type(free) is int and free > 0


def test_free_memory_of_meta_is_an_error():
    with pytest.raises(DeviceError, match="meta"):
        free_memory_bytes(torch.device("meta"))


@pytest.mark.parametrize(
    ("given", "expected"),
    [("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), ("bf16", torch.bfloat16),
     ("fp16", torch.float16), ("FP32", torch.float32), (torch.int8, torch.int8), (None, None)],
)
def test_parse_dtype_table(given, expected):
    assert parse_dtype(given) is expected


def test_parse_dtype_errors_name_the_value_and_the_way_out():
    with pytest.raises(DtypeError, match="'float17' is not a torch dtype.*bfloat16"):
        parse_dtype("float17")
    with pytest.raises(DtypeError, match="int8 is not a floating-point dtype"):
        parse_dtype(torch.int8, floating=True)


# --- hostile values: a typed error naming the value, never a silent wrong result -----------------
@pytest.mark.parametrize(
    ("given", "match"),
    [
        ("1" + "0" * 400 + "GB", "more than 40 digits"),  # float() would overflow to inf
        ("9223372036854775808", "more than 9223372036854775807 bytes"),
        (10**400, "more than 9223372036854775807 bytes"),
        (float("nan"), "not a number"),
        (float("-inf"), "infinite"),
        (-0.5, "negative"),
        ("0.5", "'0.5' is not a whole number of bytes"),  # was 0 bytes
        (0.5, "0.5 is not a whole number of bytes"),
        ("1.5B", "not a whole number of bytes"),
        ("0.0000000001GB", "less than one byte"),
    ],
)
def test_parse_size_refuses_with_the_reason(given, match):
    with pytest.raises(SizeError, match=match):
        parse_size(given)


@pytest.mark.parametrize(
    ("given", "expected"),
    [("0.1KiB", 102), ("0.3GB", 300_000_000), ("1.0", 1), (2.0, 2),
     ("9223372036854775807", 2**63 - 1)],
)
def test_parse_size_rounds_fractions_of_a_unit_down(given, expected):
    assert parse_size(given) == expected


@pytest.mark.parametrize("text", ["cpu=1GB,cpu=2GB", " disk=1GB , disk=1GB "])
def test_max_memory_text_refuses_a_key_given_twice(text):
    key = text.split("=")[0].strip()
    with pytest.raises(SizeError, match=f"names '{key}' twice .*give each device once"):
        parse_max_memory_text(text)


def test_cli_max_memory_reports_hostile_sizes_as_usage_errors():
    import argparse

    from bigload.cli.common import max_memory

    for text in ("cpu=1e400GB", "cpu=" + "9" * 400 + "GB", "cpu=1GB,cpu=2GB", "cuda:999=1GB"):
        with pytest.raises(argparse.ArgumentTypeError):
            max_memory(text)


@pytest.mark.parametrize("given", ["cuda:²", "²", "1²", "cuda:١", "cuda:1.5", "cuda: 1"])
def test_parse_device_refuses_non_ascii_digits(given):
    with pytest.raises(DeviceError, match="unknown device"):
        parse_device(given, check_available=False)


@pytest.mark.parametrize(
    "given", [128, 300, 10**30, "128", "cuda:128", "cuda:256", "cuda:99999999999999999999",
              "xpu:1000", "9" * 5000]
)
def test_parse_device_refuses_indices_torch_would_wrap(given):
    # torch keeps the index in an int8: cuda:256 would silently be cuda:0, 300 cuda:44
    with pytest.raises(DeviceError, match=r"out of range: torch numbers devices 0\.\.127"):
        parse_device(given, check_available=False)


@CUDA_OR_NONE
def test_parse_device_keeps_the_highest_index():
    assert parse_device("cuda:127", check_available=False) == torch.device("cuda", 127)
    assert parse_device(127, check_available=False).index == 127
