"""The only place that parses device names and memory sizes and asks for free memory.

Public functions accept ``int | str | torch.device`` and ``"24GiB"``-style sizes; inside bigload a
placement is a ``torch.device`` or the string ``"disk"``, and a size is an ``int`` of bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Union

import torch

from .errors import DeviceError, DtypeError, SizeError
from .memory import AvailableMemory, available_memory

DISK: Literal["disk"] = "disk"
Placement = Union[torch.device, Literal["disk"]]
DeviceLike = Union[int, str, torch.device]

_ACCELERATOR_TYPES = ("cuda", "xpu", "mps", "npu", "hpu")
_KNOWN_TYPES = set(_ACCELERATOR_TYPES) | {"cpu", "meta"}
# torch keeps a device index in an int8: torch.device("cuda", 300) is cuda:44, "cuda:256" cuda:0
MAX_DEVICE_INDEX = 127
_INDEXED = re.compile(r"[a-z]+:([0-9]+)", re.ASCII)


def accelerator_type() -> str | None:
    """The accelerator kind of this machine (``"cuda"``, ``"xpu"``, ``"mps"``, ...), or None."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        return acc.current_accelerator().type
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.backends.mps.is_available():
        return "mps"
    return None


def accelerator_count() -> int:
    kind = accelerator_type()
    if kind is None:
        return 0
    module = getattr(torch, kind, None)
    count = getattr(module, "device_count", None)
    return int(count()) if count is not None else 1


def parse_device(device: DeviceLike, *, check_available: bool = True) -> torch.device:
    """Normalise ``0``, ``"cuda:1"``, ``torch.device``, ``"cpu"``, ``"meta"`` to a torch.device.

    An int means the accelerator with that index (``cuda`` when the machine has none, so that
    plans for GPUs can be made on a CPU machine with ``check_available=False``).
    """
    if isinstance(device, bool):
        raise DeviceError(f"{device!r} is not a device; use an int index, 'cpu', 'cuda:0', ...")
    if isinstance(device, int):
        result = torch.device(accelerator_type() or "cuda", _checked_index(device, device))
    elif isinstance(device, torch.device):
        result = device
    elif isinstance(device, str):
        text = device.strip().lower()
        if text.isascii() and text.isdigit():
            index = _checked_index(_index_of(text), device)
            return parse_device(index, check_available=check_available)
        result = _torch_device(text, device)
    else:
        raise DeviceError(f"{device!r} ({type(device).__name__}) is not a device")
    if result.type not in _KNOWN_TYPES:
        raise DeviceError(f"device type {result.type!r} of {device!r} is not supported by bigload")
    if result.type in _ACCELERATOR_TYPES and result.index is None:
        result = torch.device(result.type, 0)
    if check_available:
        _check_available(result, device)
    return result


def _checked_index(index: int, given: object) -> int:
    if not 0 <= index <= MAX_DEVICE_INDEX:
        raise DeviceError(
            f"device index {_short(given)} is out of range: torch numbers devices "
            f"0..{MAX_DEVICE_INDEX}; use 0, 1, ... or 'cpu'"
        )
    return index


def _index_of(digits: str) -> int:
    """The value of ASCII ``digits``; past-range for long ones (no int() of 5000 digits)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 4 else MAX_DEVICE_INDEX + 1


def _torch_device(text: str, given: str) -> torch.device:
    """``torch.device(text)``, with the index bounded first (torch wraps it silently)."""
    indexed = _INDEXED.fullmatch(text)
    if indexed:
        _checked_index(_index_of(indexed.group(1)), given)
    try:
        return torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise DeviceError(
            f"unknown device {_short(given)}; use an int index, 'cpu', 'cuda:0', 'mps', 'xpu', "
            "'meta' (or 'disk' where offload is allowed)"
        ) from err


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _check_available(device: torch.device, given: object) -> None:
    if device.type in ("cpu", "meta"):
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {given!r}: MPS is not available on this machine")
        return
    module = getattr(torch, device.type, None)
    available = module is not None and module.is_available()
    if not available:
        raise DeviceError(
            f"device {given!r}: no {device.type} device is available on this machine; "
            "use 'cpu' (and 'disk' for offload) or check the driver"
        )
    count = module.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(
            f"device {given!r}: this machine has {count} {device.type} device(s) "
            f"(indices 0..{count - 1})"
        )


def parse_placement(value: DeviceLike, *, check_available: bool = True) -> Placement:
    """Like :func:`parse_device`, but also accepts ``"disk"``."""
    if isinstance(value, str) and value.strip().lower() == DISK:
        return DISK
    return parse_device(value, check_available=check_available)


def placement_str(placement: Placement) -> str:
    """Canonical text of a placement: ``"cuda:0"``, ``"cpu"``, ``"disk"``."""
    return placement if isinstance(placement, str) else str(placement)


def is_accelerator(placement: Placement) -> bool:
    return isinstance(placement, torch.device) and placement.type in _ACCELERATOR_TYPES


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10, "ki": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20, "mi": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "gi": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40, "ti": 1 << 40,
    "p": 1000**5, "pb": 1000**5, "pib": 1 << 50, "pi": 1 << 50,
}


MAX_SIZE_BYTES = 2**63 - 1  # 8 EiB: what the OS and torch can count, more than any device has
_MAX_DIGITS = 40


def parse_size(value: int | float | str, *, what: str = "size") -> int:
    """``"24GiB"`` → 25769803776, ``"500MB"`` → 500000000, ``1024`` → 1024 (bytes).

    Bytes are whole: a number without a unit (or with ``B``) must be a whole number (``"0.5"``
    and ``0.5`` are refused, ``1.5e3`` is 1500). With a larger unit the exact value is rounded
    down to whole bytes (``"0.3KB"`` → 300, ``"0.1KiB"`` → 102), never up, so a budget never
    exceeds what was written; a positive value that rounds down to 0 is refused. Sizes above
    :data:`MAX_SIZE_BYTES` (8 EiB) are refused.
    """
    if isinstance(value, bool):
        raise SizeError(f"{what}: {value!r} is not a size")
    if isinstance(value, int):
        return _bounded(value, value, what)
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise _out_of_range(value, what)
        return _bounded(_whole_bytes(Fraction(value), value, what), value, what)
    if not isinstance(value, str):
        raise SizeError(f"{what}: {_short(value)} ({type(value).__name__}) is not a size")
    return _bounded(_parse_size_text(value, what), value, what)


def _parse_size_text(value: str, what: str) -> int:
    match = _SIZE_RE.match(value)
    unit = (match.group(2) or "").lower() if match else None
    if match is not None and len(match.group(1)) > _MAX_DIGITS:
        raise SizeError(f"{what}: {_short(value)} has more than {_MAX_DIGITS} digits; write "
                        "a size such as '10GiB'")  # fmt: skip
    if match is None or unit not in _UNITS:
        raise SizeError(
            f"{what}: cannot parse {_short(value)}; write bytes or a number with a unit such as "
            "'10GiB', '10GB', '1.5GiB', '500MB'"
        )
    exact = Fraction(match.group(1)) * _UNITS[unit]
    size = _whole_bytes(exact, value, what) if _UNITS[unit] == 1 else math.floor(exact)
    if size == 0 and exact > 0:
        raise SizeError(f"{what}: {_short(value)} is less than one byte; write a whole number "
                        "of bytes or a larger value such as '1KiB'")  # fmt: skip
    return size


def _whole_bytes(exact: Fraction, given: object, what: str) -> int:
    if exact.denominator != 1:
        raise SizeError(f"{what}: {_short(given)} is not a whole number of bytes; write whole "
                        "bytes ('512') or use a unit ('0.5KiB', '1.5GiB')")  # fmt: skip
    return int(exact)


def _bounded(size: int, given: object, what: str) -> int:
    if not 0 <= size <= MAX_SIZE_BYTES:
        raise _out_of_range(given, what)
    return size


def _out_of_range(given: object, what: str) -> SizeError:
    return SizeError(
        f"{what}: {_short(given)} is negative, infinite, not a number or more than "
        f"{MAX_SIZE_BYTES} bytes (8 EiB); give a size from 0 up (leave disk out of max_memory "
        "for no limit)"
    )


def format_size(size_bytes: int | float) -> str:
    """1536 → '1.5 KiB'."""
    size = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def parse_max_memory(
    max_memory: Mapping[DeviceLike, int | float | str], *, check_available: bool = False
) -> dict[Placement, int]:
    """Normalise a ``max_memory`` mapping's keys (placements) and values (bytes)."""
    if not isinstance(max_memory, Mapping):
        raise SizeError(f"max_memory must be a mapping such as {{0: '20GiB', 'cpu': '8GiB'}}, "
                        f"not {type(max_memory).__name__}")
    result: dict[Placement, int] = {}
    for key, value in max_memory.items():
        try:
            placement = parse_placement(key, check_available=check_available)
        except DeviceError as err:
            raise SizeError(f"max_memory key {_short(key)}: {err}") from err
        if placement == torch.device("meta"):
            raise SizeError(
                f"max_memory key {_short(key)}: 'meta' holds no data and takes no budget"
            )
        if placement in result:
            raise SizeError(
                f"max_memory names {placement_str(placement)} twice (key {_short(key)})"
            )
        result[placement] = parse_size(value, what=f"max_memory[{_short(key)}]")
    return result


def parse_max_memory_text(text: str) -> dict[Placement, int]:
    """CLI form: ``"0=20GiB,cpu=8GiB,disk=100GiB"``. A key given twice is refused, as in the
    mapping form (the text would otherwise keep the last one silently)."""
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise SizeError(f"--max-memory: {_short(part)} is not KEY=SIZE (e.g. 0=20GiB,cpu=8GiB)")
        if key in pairs:
            raise SizeError(
                f"--max-memory names {_short(key)} twice (sizes {_short(pairs[key])} and "
                f"{_short(value)}); give each device once"
            )
        pairs[key] = value
    return parse_max_memory(pairs)


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of a device now, in bytes (see :func:`free_memory`)."""
    return free_memory(device).size_bytes


@dataclass(frozen=True)
class FreeMemory:
    """Bytes a device has free for this process now, and where the figure comes from."""

    size_bytes: int
    source: str


def free_memory(device: torch.device) -> FreeMemory:
    """What torch reports for an accelerator; for the CPU (and MPS, which shares it) the smaller
    of the host's available RAM and the free memory under this process's memory cgroup limits
    (``bigload.memory``)."""
    if device.type in ("cpu", "mps"):
        found = available_memory()
        return FreeMemory(found.size_bytes, memory_source(found))
    module = getattr(torch, device.type, None)
    if hasattr(module, "mem_get_info"):
        free, _total = module.mem_get_info(device)
        return FreeMemory(int(free), f"free memory of {device}")
    raise DeviceError(f"cannot ask {device} for its free memory")


def cache_can_hold(nbytes: int) -> bool:
    """Whether ``nbytes`` of file pages can stay in the page cache: they fit twice in what this
    process may still take (the host's available RAM, or less under a memory cgroup). Where
    they do, the tiers serve weights as views of their files; elsewhere as memory of their own
    (the CPU tier) and reads that drop the cache behind them (the disk tier)."""
    return 2 * nbytes <= free_memory(torch.device("cpu")).size_bytes


def memory_source(found: AvailableMemory) -> str:
    """'available RAM (21.3 GiB)', or '2.1 GiB free under the cgroup limit 3.0 GiB (memory.max
    of /sys/fs/cgroup/job)'."""
    limit = found.limit
    if limit is None:
        return f"available RAM ({format_size(found.size_bytes)})"
    folder, _, name = limit.limit_file.rpartition("/")
    return (f"{format_size(limit.free_bytes)} free under the cgroup limit "
            f"{format_size(limit.limit_bytes)} ({name} of {folder})")


_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "fp64": "float64", "double": "float64"}


def parse_dtype(
    dtype: torch.dtype | str | None, *, floating: bool = False, what: str = "dtype"
) -> torch.dtype | None:
    """``torch.bfloat16``, ``"bfloat16"``, ``"torch.float16"``, ``"bf16"``, ``"fp16"`` →
    torch.dtype (None stays None). ``floating=True`` refuses int/bool dtypes."""
    if dtype is None or isinstance(dtype, torch.dtype):
        result = dtype
    else:
        name = str(dtype).strip().removeprefix("torch.")
        result = getattr(torch, _DTYPE_ALIASES.get(name.lower(), name), None)
        if not isinstance(result, torch.dtype):
            raise DtypeError(
                f"{what}={_short(dtype)} is not a torch dtype; use e.g. torch.bfloat16, "
                "'bfloat16', 'float16' or 'float32'"
            )
    if floating and result is not None and not result.is_floating_point:
        raise DtypeError(
            f"{what}={result} is not a floating-point dtype: it casts float tensors only (int "
            "and bool tensors keep their own dtype); use e.g. torch.bfloat16"
        )
    return result
