"""Budgets: how many bytes each placement may take, where each figure came from, and the balanced
shares of the accelerators. Budgets are read once, here; planning itself is pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..devices import (
    DISK,
    DeviceLike,
    accelerator_count,
    accelerator_type,
    free_memory,
    parse_max_memory,
    parse_size,
    placement_str,
)
from .placements import tier_key

CPU_FRACTION = 0.9  # of available RAM, the CPU budget when max_memory is not given
HEADROOM_FRACTION = 0.05  # of the main accelerator's budget, kept for activations when offloading


@dataclass(frozen=True)
class Budgets:
    """Placement → bytes in tier order (``None``: unbounded, only disk), and each one's source."""

    limits: dict[str, int | None]
    sources: dict[str, str]

    def accelerators(self) -> list[str]:
        """Accelerators with a budget, in tier order."""
        return [p for p, b in self.limits.items() if p not in ("cpu", DISK) and b]


def read_budgets(max_memory: Mapping[DeviceLike, int | float | str] | None) -> Budgets:
    """The budgets given (disk unbounded unless named), or detected on this machine."""
    if max_memory is None:
        limits, sources = detected_budgets(CPU_FRACTION)
    else:
        parsed = parse_max_memory(max_memory)
        limits = {placement_str(p): b for p, b in parsed.items()}
        sources = dict.fromkeys(limits, "given")
    limits.setdefault(DISK, None)
    sources.setdefault(DISK, "unbounded")
    order = sorted(limits, key=tier_key)
    return Budgets({p: limits[p] for p in order}, {p: sources[p] for p in order})


def detected_budgets(cpu_fraction: float) -> tuple[dict[str, int | None], dict[str, str]]:
    """Free memory of each accelerator and ``cpu_fraction`` of the memory this process may still
    take (available RAM, or less under a memory cgroup limit: ``bigload.memory``)."""
    kind = accelerator_type()
    limits: dict[str, int | None] = {}
    sources: dict[str, str] = {}
    for i in range(accelerator_count() if kind else 0):
        device = torch.device(kind, i)  # type: ignore[arg-type]
        free = free_memory(device)
        limits[str(device)], sources[str(device)] = free.size_bytes, free.source
    if kind != "mps":  # MPS shares host RAM: a separate CPU budget would count it twice
        available = free_memory(torch.device("cpu"))
        limits["cpu"] = int(cpu_fraction * available.size_bytes)
        sources["cpu"] = f"{cpu_fraction:.0%} of {available.source}"
    return limits, sources


def headroom(headroom_bytes: int | str | None, budgets: Budgets, main: str) -> int:
    """Bytes kept free on the main device for activations when anything is offloaded."""
    if headroom_bytes is not None:
        return parse_size(headroom_bytes, what="headroom_bytes")
    if main == "cpu":
        return 0
    return int(HEADROOM_FRACTION * (budgets.limits.get(main) or 0))


def balanced_targets(
    strategy: str, budgets: Budgets, sizes: list[int], largest_whole: int
) -> dict[str, int]:
    """Balanced shares of the accelerators (as accelerate's get_balanced_memory); the last
    accelerator keeps its whole budget. ``sizes`` are the units' bytes."""
    accels = budgets.accelerators()
    if strategy == "sequential" or len(accels) < 2:
        return {}
    limits = budgets.limits
    low_zero = strategy == "balanced_low_0"
    total = sum(sizes)
    share = total // (len(accels) - 1 if low_zero else len(accels))
    share += balance_slack(sizes, largest_whole)
    targets = {p: min(share, limits[p]) for p in accels[:-1]}  # type: ignore[type-var]
    if low_zero:
        others = sum(targets.get(p, limits[p]) for p in accels[1:])  # type: ignore[misc]
        targets[accels[0]] = min(limits[accels[0]], max(0, total - others))  # type: ignore[type-var]
    return targets


def balance_slack(sizes: list[int], largest_whole: int) -> int:
    """Extra room per accelerator so that whole units do not spill: 1.25 × the larger of the
    largest no-split unit and the mean unit."""
    sized = [s for s in sizes if s]
    mean = sum(sized) // max(len(sized), 1)
    return int(1.25 * max(largest_whole, mean))
