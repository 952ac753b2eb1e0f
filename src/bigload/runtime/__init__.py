"""Running a placed model: ``dispatch`` attaches the hooks a plan implies (inputs moved to each
unit's device, offloaded weights paged in and released); ``remove_hooks`` takes them off."""

from __future__ import annotations

from .attach import build_units, dispatch, remove_hooks, state_of
from .hooks import STATE_ATTR, DispatchState, Unit
from .moves import send_to_device

__all__ = [
    "STATE_ATTR",
    "DispatchState",
    "Unit",
    "build_units",
    "dispatch",
    "remove_hooks",
    "send_to_device",
    "state_of",
]
