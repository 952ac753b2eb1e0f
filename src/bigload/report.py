"""What a load did (``LoadReport``: loaded, tied, initialised, kept, cast, bytes per device) and
the progress bar of a long load."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .devices import format_size
from .errors import format_problems


@dataclass
class LoadReport:
    """What a load did: every tensor of the model is in exactly one of loaded / initialized /
    kept (tied aliases are listed under ``tied``)."""

    checkpoint: str
    model_class: str
    loaded: list[str] = field(default_factory=list)
    initialized: dict[str, str] = field(default_factory=dict)  # fqn -> how
    kept: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    tied: list[tuple[str, ...]] = field(default_factory=list)
    cast: dict[str, str] = field(default_factory=dict)  # fqn -> "bfloat16->float32"
    bytes_per_device: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    zero_copy: int = 0
    seconds: float = 0.0
    prefix_change: str | None = None
    offload_folder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["tied"] = [list(g) for g in self.tied]
        return out

    def __str__(self) -> str:
        from .plan.render import table

        lines = [
            f"loaded {self.model_class} from {self.checkpoint!r} in {self.seconds:.2f} s",
            f"  tensors loaded: {len(self.loaded)} ({self.zero_copy} as zero-copy file views)",
            f"  tied groups: {len(self.tied)}",
            f"  initialised (not in the checkpoint): {len(self.initialized)}",
            f"  kept (real buffers not in the checkpoint): {len(self.kept)}",
            f"  unexpected (in the checkpoint, unused): {len(self.unexpected)}",
            f"  cast: {len(self.cast)}",
            f"  bytes written to an offload folder: {format_size(self.bytes_written)}",
        ]
        if self.prefix_change:
            lines.append(f"  checkpoint keys {self.prefix_change}")
        rows = [[device, format_size(size)] for device, size in self.bytes_per_device.items()]
        lines += ["", *table(["device", "bytes"], rows, right={1})] if rows else [
            "  bytes per device: none"]
        if self.initialized:
            lines.append("initialised tensors:\n" + format_problems(
                [f"{k!r}: {v}" for k, v in self.initialized.items()]))
        return "\n".join(lines)


class _NoBar:
    def update(self, n: int) -> None:
        pass


class progress:  # noqa: N801 - a context manager used like a function
    """A byte-counting bar over ``total_bytes``: none by default (the library logs; the CLI
    draws), tqdm's with ``enabled=True``, or the caller's own when ``enabled`` is a callable: it
    gets the total and returns an object with ``update(n)`` and ``close()`` (how the CLI draws
    its own)."""

    def __init__(self, enabled: bool | None | Callable[[int], Any], total_bytes: int):
        self.factory = enabled if callable(enabled) else None
        self.enabled = bool(enabled)
        self.total = total_bytes
        self.bar: Any = _NoBar()

    def __enter__(self) -> Any:
        if self.factory is not None:
            self.bar = self.factory(self.total)
        elif self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="loading", leave=False)
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.close()
