"""Every parser at bigload's edge, fuzzed: each input gives the correct result or a BigloadError.

Any other exception fails the test, and so does a hang (a deadline per example). Where the result
is checkable it is checked: a file that loads must give the tensors the reference reader
(``safetensors.torch.load``, ``torch.load``) gives, a size must be the exact number of bytes.
Deterministic (``derandomize=True``). The default run is quick; ``pytest -m fuzz`` runs the same
properties with ten times the examples (thousands per parser).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import re
import zipfile
from collections.abc import Callable
from decimal import ROUND_FLOOR, Decimal, localcontext
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from bigload.checkpoint import CheckpointReader, read_index
from bigload.checkpoint._safetensors import DTYPES
from bigload.cli.common import max_memory
from bigload.devices import (
    DISK,
    MAX_DEVICE_INDEX,
    MAX_SIZE_BYTES,
    parse_device,
    parse_dtype,
    parse_max_memory,
    parse_max_memory_text,
    parse_placement,
    parse_size,
)
from bigload.errors import BigloadError
from hostile import deadline, record, rezip

# a mutated PROTO byte makes torch's unpickler warn, a STRING opcode with a bad escape makes
# pickletools warn (hidden by default), before the pickle is refused or read
pytestmark = [pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
              pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")]
DEADLINE_S = 20  # per example: far above any honest parse of these small inputs
LONG = 10  # `-m fuzz` runs this many times the default examples


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)  # fmt: skip


def fuzz(examples: int, **strategies: st.SearchStrategy) -> Callable:
    """Turn ``check(workdir, **drawn)`` into two tests: ``examples`` in the default run, and
    ``LONG`` times as many behind the ``fuzz`` marker (also ``slow``, so the default skips it)."""

    def make(check: Callable) -> tuple[Callable, Callable]:
        def with_deadline() -> Callable:
            @functools.wraps(check)
            def run(*args: object, **kwargs: object) -> None:
                with deadline(DEADLINE_S):
                    check(*args, **kwargs)

            return run

        quick = _settings(examples)(given(**strategies)(with_deadline()))
        long = _settings(examples * LONG)(given(**strategies)(with_deadline()))
        return quick, pytest.mark.slow(pytest.mark.fuzz(long))

    return make


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _outcome(fn: Callable[[], object]) -> object | BigloadError:
    """``fn()``, or the BigloadError it raised; any other exception propagates (and fails)."""
    try:
        result = fn()
    except BigloadError as err:
        assert str(err), "a BigloadError must say what failed"
        _event(f"refused: {type(err).__name__}")
        return err
    _event("accepted")
    return result


def _event(outcome: str) -> None:
    """Count outcomes: ``pytest --hypothesis-show-statistics`` prints the share of each."""
    if currently_in_test_context():
        event(outcome)


# --- inputs: real files from the real writers, then mutated ---------------------------------------
def _state_dicts() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, generator=g)
    return [
        {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g).bfloat16(),
         "i": torch.arange(6).reshape(2, 3), "m": torch.tensor([True, False])},
        {"h": torch.randn(5, generator=g).half(), "u": torch.tensor([1, 2, 3], dtype=torch.uint16),
         "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn), "s": torch.tensor(2.5),
         "e": torch.zeros(0, 3), "d": torch.randn(2, generator=g).double()},
    ] + [{"a": base[2:8].reshape(2, 3), "t": base.reshape(3, 4).t(), "p": torch.nn.Parameter(
        base[:4].clone())}]  # fmt: skip


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    plain = {k: v.detach().contiguous() for k, v in tensors.items()}
    plain = {k: (v.clone() if k == "a" else v) for k, v in plain.items()}  # views of one storage
    return safetensors.torch.save(plain, metadata={"format": "pt"})


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


SAFETENSORS_FILES = [_safetensors_bytes(sd) for sd in _state_dicts()]
TORCH_FILES = [_torch_bytes(sd) for sd in _state_dicts()] + [
    _torch_bytes({"state_dict": _state_dicts()[0], "epoch": 3})
]


@st.composite
def mutated(draw: st.DrawFn, bases: list[bytes], header_bias: bool = True) -> bytes:
    """A real file with 1-4 byte-level mutations (flip, set, insert, delete, truncate, a new
    8-byte length), most of them in the first 512 bytes where the headers are."""
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        limit = min(len(data), 512) if header_bias and draw(st.booleans()) else len(data)
        at = draw(st.integers(0, limit - 1))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "length",
                                     "data"]))  # fmt: skip
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0, 0xFF, ord('"'), ord("["), ord("{"), ord("9")]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "length":
            data[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
        else:  # tensor bytes only (past a safetensors header): a file that still loads
            start = min(len(data) - 1, 8 + int.from_bytes(data[:8], "little"))
            data[draw(st.integers(start, len(data) - 1))] ^= 0xFF
    return bytes(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip
ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPES, "F4", "C64", "f32", ""]) | JSON,
        "shape": st.lists(st.sampled_from([0, 1, 2, 3, 4, -1, 2**31, 2**62, 2**63, 2**64]),
                          max_size=4) | JSON,
        "data_offsets": st.lists(st.integers(-2, 80) | st.sampled_from([2**63, 2**64]),
                                 max_size=3) | JSON,
    }
)  # fmt: skip


@st.composite
def structured_safetensors(draw: st.DrawFn) -> bytes:
    """A header of plausible and implausible entries over some bytes, written as JSON."""
    header = draw(st.dictionaries(st.text(max_size=4), ENTRY | JSON, max_size=5))
    if draw(st.booleans()):
        header["__metadata__"] = draw(JSON)
    text = json.dumps(header).encode()
    if draw(st.booleans()):  # repeat a key: the safetensors library refuses such a header
        text = text.replace(b"{", b'{"k": 1, "k": 2, ', 1) if len(text) > 2 else text
    return len(text).to_bytes(8, "little") + text + draw(st.binary(max_size=96))


# --- safetensors headers --------------------------------------------------------------------------
def _loaded(path: Path) -> dict[str, torch.Tensor] | BigloadError:
    def load() -> dict[str, torch.Tensor]:
        with CheckpointReader(read_index(path)) as reader:  # views outlive the reader
            return {name: reader.get(name) for name in reader.index}

    return _outcome(load)


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert (got[name].dtype, got[name].shape) == (tensor.dtype, tensor.shape), name
        assert _as_bytes(got[name]) == _as_bytes(tensor), name


def _check_safetensors(workdir: Path, data: bytes) -> None:
    file = workdir / "model.safetensors"
    file.write_bytes(data)
    got = _loaded(file)
    if isinstance(got, BigloadError):
        return
    try:
        expected = safetensors.torch.load(data)
    except Exception:  # noqa: BLE001 - the reference refuses more (holes, non-string metadata)
        _event("accepted, the reference refuses")
        return
    _event("accepted, same tensors as the reference")
    _assert_same(got, expected)


test_safetensors_mutated, test_safetensors_mutated_long = fuzz(
    400, data=mutated(SAFETENSORS_FILES))(_check_safetensors)
test_safetensors_structured, test_safetensors_structured_long = fuzz(
    300, data=structured_safetensors())(_check_safetensors)


def test_real_safetensors_files_load_as_the_reference(workdir):
    for data in SAFETENSORS_FILES:
        _check_safetensors(workdir, data)
        assert not isinstance(_loaded(workdir / "model.safetensors"), BigloadError)


# --- shard indexes --------------------------------------------------------------------------------
SHARDS = {"s1.safetensors": {"a": torch.ones(2), "b": torch.arange(3.0)},
          "s2.safetensors": {"c": torch.zeros(4)}}  # fmt: skip
SHARD_NAMES = [*SHARDS, "s3.safetensors", "./s1.safetensors", "sub/../s2.safetensors", "../s1",
               "", "/etc/passwd", "x" * 300 + ".safetensors", "s1.safetensors\x00", ".",
               "model.safetensors.index.json"]  # fmt: skip
WEIGHT_MAP = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]),
                             st.sampled_from(SHARD_NAMES) | JSON, max_size=5)  # fmt: skip


@st.composite
def shard_index(draw: st.DrawFn) -> bytes:
    truth = {name: shard for shard, tensors in SHARDS.items() for name in tensors}
    doc = draw(st.sampled_from([{"metadata": {"total_size": 36}, "weight_map": truth}, {}]))
    doc = {**doc, **draw(st.dictionaries(st.sampled_from(["metadata", "weight_map", "x"]),
                                         JSON | WEIGHT_MAP, max_size=2))}  # fmt: skip
    text = json.dumps(doc).encode()
    return draw(mutated([text], header_bias=False)) if draw(st.booleans()) else text


def _check_shard_index(workdir: Path, text: bytes) -> None:
    folder = workdir / "sharded"
    if not folder.exists():
        folder.mkdir()
        for shard, tensors in SHARDS.items():
            safetensors.torch.save_file(tensors, folder / shard)
    (folder / "model.safetensors.index.json").write_bytes(text)
    got = _loaded(folder)
    if isinstance(got, BigloadError):
        return
    index = read_index(folder)
    for shard, tensors in SHARDS.items():
        for name, tensor in tensors.items():
            if name in got:
                assert index[name].file == folder.resolve() / shard
                assert torch.equal(got[name], tensor)


test_shard_index, test_shard_index_long = fuzz(300, text=shard_index())(_check_shard_index)


# --- torch zips -----------------------------------------------------------------------------------
# pickle pieces a state dict's data.pkl is made of, and some it never holds
_OPCODES = [b"(", b"t", b"Q", b"R", b"s", b"u", b"}", b"]", b"a", b"e", b")", b"N", b"\x88",
            b"\x89", b"\x85", b"\x86", b"\x87", b"0", b"2", b"b", b"h\x00", b"h\x01", b"q\x00",
            b"q\x01", b"K\x00", b"K\x02", b"K\x08", b"J\xff\xff\xff\x7f", b"J\xff\xff\xff\xff",
            b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x40", b"X\x01\x00\x00\x00w",
            b"X\x07\x00\x00\x00storage", b"X\x01\x00\x00\x000", b"X\x03\x00\x00\x00cpu",
            b"ctorch\nFloatStorage\n", b"ctorch\nLongStorage\n", b"ctorch\nbfloat16\n",
            b"ctorch.storage\nUntypedStorage\n", b"ctorch._utils\n_rebuild_tensor_v2\n",
            b"ctorch._utils\n_rebuild_tensor_v3\n", b"ctorch._utils\n_rebuild_parameter\n",
            b"ctorch._tensor\n_rebuild_from_type_v2\n", b"ctorch\nTensor\n", b"ctorch\nSize\n",
            b"ccollections\nOrderedDict\n", b"c_codecs\nencode\n", b"cbuiltins\nset\n",
            b"\x94", b"\x95\x01\x00\x00\x00\x00\x00\x00\x00"]  # fmt: skip


@st.composite
def torch_zip(draw: st.DrawFn) -> bytes:
    """A real torch.save file mutated as bytes, or rebuilt with a mutated pickle, a record cut
    or grown, deflated records, or a storage's numel changed."""
    data = draw(st.sampled_from(TORCH_FILES))
    kind = draw(st.sampled_from(["bytes", "pickle", "record", "deflate", "numel", "values",
                                 "opcodes"]))  # fmt: skip
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    if kind == "bytes":
        return draw(mutated([data], header_bias=False))
    if kind == "pickle":
        pickled = draw(mutated([record(data, "data.pkl")], header_bias=False))
        return rezip(data, {"data.pkl": pickled}, method=method)
    if kind == "opcodes":  # a pickle of state-dict pieces in any order, over the real records
        pieces = draw(st.lists(st.sampled_from(_OPCODES), max_size=40))
        return rezip(data, {"data.pkl": b"\x80\x02" + b"".join(pieces) + b"."}, method=method)
    if kind == "record":
        body = record(data, "data/0")
        cut = draw(st.integers(0, len(body) + 8))
        return rezip(data, {"data/0": (body + bytes(8))[:cut]}, method=method)
    if kind == "deflate":
        return rezip(data, method=zipfile.ZIP_DEFLATED)
    if kind == "values":  # other tensor bytes of the same size: a file that still loads
        body = record(data, "data/0")
        noise = draw(st.binary(min_size=len(body), max_size=len(body)))
        return rezip(data, {"data/0": noise}, method=method)
    numel = draw(st.sampled_from([0, 1, 7, 2**31 - 1, 2**40, 2**62]))
    pickled = re.sub(rb"K.(t(?:q.)?Q)", b"\x8a\x08" + numel.to_bytes(8, "little") + rb"\1",
                     record(data, "data.pkl"), count=1, flags=re.DOTALL)  # fmt: skip
    return rezip(data, {"data.pkl": pickled}, method=method)


def _torch_reference(data: bytes) -> dict[str, torch.Tensor] | None:
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True)  # no mmap: reads every record
    except Exception:  # noqa: BLE001 - e.g. a CRC error torch finds in data we map unread
        return None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    return {k: v.detach() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _check_torch_zip(workdir: Path, data: bytes) -> None:
    file = workdir / "model.pt"
    file.write_bytes(data)
    got = _loaded(file)
    if isinstance(got, BigloadError):
        return
    expected = _torch_reference(data)  # safe: every storage we served matched its record
    _event(f"accepted, {'the reference refuses' if expected is None else 'same tensors'}")
    if expected is not None:
        _assert_same(got, expected)


test_torch_zip, test_torch_zip_long = fuzz(300, data=torch_zip())(_check_torch_zip)


def test_real_torch_files_load_as_torch_load(workdir):
    for data in TORCH_FILES:
        (workdir / "model.pt").write_bytes(data)
        got = _loaded(workdir / "model.pt")
        assert not isinstance(got, BigloadError), got
        _assert_same(got, _torch_reference(data))


# --- sizes and budgets ----------------------------------------------------------------------------
UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024, "m": 10**6,
         "mb": 10**6, "mib": 2**20, "mi": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30,
         "gi": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40, "ti": 2**40, "p": 10**15,
         "pb": 10**15, "pib": 2**50, "pi": 2**50}  # fmt: skip
SIZE_TEXT = st.builds(
    lambda space, number, unit, upper: f"{space}{number}{space}{unit.upper() if upper else unit}",
    st.sampled_from(["", " ", "\t", "\u00a0"]),
    st.from_regex(r"[0-9]{0,45}\.?[0-9]{1,45}|[0-9²١]{1,3}|1e400|-1|nan|inf", fullmatch=True),
    st.sampled_from([*UNITS, "x", "gibs", "Gb "]),
    st.booleans(),
)  # fmt: skip
SIZE = st.one_of(SIZE_TEXT, st.text(max_size=12), st.integers(-(2**70), 2**70),
                 st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
                 st.binary(max_size=4), st.lists(st.integers(), max_size=2))  # fmt: skip


def _expected_size(value: object) -> int | None:
    """The exact bytes of a size text, computed independently (Decimal, 200 digits)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(value), re.I | re.ASCII)
    if not isinstance(value, str) or not match or match.group(2).lower() not in UNITS:
        return None
    with localcontext() as ctx:
        ctx.prec = 200
        exact = Decimal(match.group(1)) * UNITS[match.group(2).lower()]
        return int(exact.to_integral_value(rounding=ROUND_FLOOR))


def _check_size(workdir: Path, value: object) -> None:
    got = _outcome(lambda: parse_size(value, what="fuzz"))
    if isinstance(got, BigloadError):
        return
    assert type(got) is int and 0 <= got <= MAX_SIZE_BYTES
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert got == value
    expected = _expected_size(value)
    if expected is not None:
        assert got == expected


test_parse_size, test_parse_size_long = fuzz(400, value=SIZE)(_check_size)

PLACEMENT_KEYS = st.one_of(st.sampled_from(
    ["cpu", "CPU", " disk ", "disk", "meta", "cuda", "cuda:1", "cuda:128", "mps", "0", "²"]),
    st.integers(-3, 300), st.text(max_size=8))  # fmt: skip


def _check_max_memory(workdir: Path, mapping: dict) -> None:
    got = _outcome(lambda: parse_max_memory(mapping))
    if isinstance(got, BigloadError):
        return
    assert len(got) == len(mapping)
    for placement, size in got.items():
        assert placement == DISK or isinstance(placement, torch.device)
        assert type(size) is int and 0 <= size <= MAX_SIZE_BYTES


VALID_KEY = st.sampled_from(["cpu", " disk ", "0", "cuda:1", 3, "mps", "xpu:2", "CUDA:4"])
VALID_SIZE = st.integers(0, 2**50) | st.builds(
    "{}{}".format, st.integers(1, 9999), st.sampled_from(["", "GB", "GiB", "mb", "KiB", " TB"]))
MAPPING = st.dictionaries(VALID_KEY, VALID_SIZE, max_size=4) | st.dictionaries(
    PLACEMENT_KEYS, VALID_SIZE | SIZE, max_size=4)
test_parse_max_memory, test_parse_max_memory_long = fuzz(
    200, mapping=MAPPING)(_check_max_memory)

MEMORY_TEXT = st.one_of(
    st.text(max_size=30),
    st.lists(st.tuples(VALID_KEY.map(str), VALID_SIZE.map(str)) | st.tuples(
        PLACEMENT_KEYS.map(str), VALID_SIZE.map(str) | st.text(max_size=5)), max_size=4)
    .map(lambda pairs: ",".join(f"{k}={v}" for k, v in pairs)),
)  # fmt: skip


def _check_max_memory_text(workdir: Path, text: str) -> None:
    got = _outcome(lambda: parse_max_memory_text(text))
    if not isinstance(got, BigloadError):
        keys = [part.partition("=")[0].strip() for part in text.split(",") if part.strip()]
        assert len(got) == len(keys)  # nothing merged in silence
    try:
        max_memory(text)
    except argparse.ArgumentTypeError as err:
        assert str(err)


test_parse_max_memory_text, test_parse_max_memory_text_long = fuzz(
    300, text=MEMORY_TEXT)(_check_max_memory_text)


# --- device names and dtypes ----------------------------------------------------------------------
DEVICE = st.one_of(
    st.integers(-(2**70), 2**70), st.integers(-2, 260), st.text(max_size=10),
    st.from_regex(r"\s*(cuda|CUDA|cpu|mps|xpu|meta|disk|npu|hpu|gpu)(:[0-9²١ ]{0,6})?\s*",
                  fullmatch=True),
    st.builds(torch.device, st.sampled_from(["cpu", "cuda", "meta"]), st.integers(0, 127)),
    st.none(), st.booleans(), st.floats(), st.binary(max_size=3),
)  # fmt: skip


def _check_device(workdir: Path, value: object, check_available: bool) -> None:
    for parse in (parse_device, parse_placement):
        got = _outcome(lambda parse=parse: parse(value, check_available=check_available))
        if isinstance(got, BigloadError) or got == DISK:
            continue
        assert isinstance(got, torch.device)
        assert got.index is None or 0 <= got.index <= MAX_DEVICE_INDEX
        if isinstance(value, int) and not isinstance(value, bool):
            assert got.index == value
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            assert got.index == int(value.strip())


test_parse_device, test_parse_device_long = fuzz(
    400, value=DEVICE, check_available=st.booleans())(_check_device)

DTYPE = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["bf16", "fp16", "half", "float", "double", "torch.float16", "FP32",
                     "float8_e4m3fn", "int64", "bool", "Tensor", "__class__", ""]),
    st.sampled_from([torch.float32, torch.int8, torch.bool, torch.complex64, torch.bfloat16]),
    st.integers(), st.none(), st.floats(),
)  # fmt: skip


def _check_dtype(workdir: Path, value: object, floating: bool) -> None:
    got = _outcome(lambda: parse_dtype(value, floating=floating))
    if isinstance(got, BigloadError):
        return
    if value is None:
        assert got is None
        return
    assert isinstance(got, torch.dtype)
    assert not floating or got.is_floating_point
    if isinstance(value, torch.dtype):
        assert got is value


test_parse_dtype, test_parse_dtype_long = fuzz(
    300, value=DTYPE, floating=st.booleans())(_check_dtype)
