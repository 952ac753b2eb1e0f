"""Planning: decide where every unit of a model lives and runs, before anything is loaded.

``plan_devices`` plans from memory budgets; ``plan_from_device_map`` takes a map written by hand.
Both return a frozen :class:`DevicePlan`, the one object the later stages (load, dispatch)
receive. Modules: ``types`` (the plan), ``budgets``, ``units``, ``solve`` (assignment and
reserve), ``planner`` (``plan_devices``), ``from_map``, ``render`` (text), ``plan_json``.
"""

from __future__ import annotations

from .budgets import CPU_FRACTION, HEADROOM_FRACTION, Budgets, read_budgets
from .from_map import check_covers, plan_from_device_map
from .placements import STRATEGIES, merge_prefixes, tier_key
from .planner import plan_devices
from .render import runs
from .types import (
    DevicePlan,
    PlannedUnit,
    default_prefetch,
    main_device_for,
)

__all__ = [
    "CPU_FRACTION",
    "HEADROOM_FRACTION",
    "STRATEGIES",
    "Budgets",
    "DevicePlan",
    "PlannedUnit",
    "check_covers",
    "default_prefetch",
    "main_device_for",
    "merge_prefixes",
    "plan_devices",
    "plan_from_device_map",
    "read_budgets",
    "runs",
    "tier_key",
]
