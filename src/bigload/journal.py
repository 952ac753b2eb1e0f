"""All or nothing: a ``Journal`` records what each replaced slot held, and on an exception every
slot gets it back, so a failed load leaves the model as it was (meta tensors stay meta)."""

from __future__ import annotations

from typing import Any

import torch

from .slots import TensorSlot
from .tensors import replace_tensor


class Journal:
    """Records what each replaced slot held; on an exception every slot gets it back, so a
    failed load leaves the model as it was (meta tensors stay meta)."""

    def __init__(self) -> None:
        self._saved: dict[tuple[int, str, bool], tuple[TensorSlot, torch.Tensor]] = {}

    def save(self, slots: Any) -> None:
        for slot in slots:
            key = (id(slot.owner), slot.leaf, slot.is_param)
            self._saved.setdefault(key, (slot, slot.tensor.detach()))

    def replace(self, slot: TensorSlot, new: torch.Tensor) -> None:
        self.save([slot])
        replace_tensor(slot, new)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            return
        for slot, old in reversed(list(self._saved.values())):
            replace_tensor(slot, old, swap=True)
