"""Models across torch.distributed ranks: the plan splits the model into stages, one per rank;
each rank reads only its own tensors; every rank runs the same calls in lockstep, and values
cross ranks only where another rank computes with them.

    torchrun --nproc-per-node 2 my_script.py     # every rank runs the same script:

    model = bigload.load("path/to/llama", world="auto")
    tokens = model.generate(**inputs, max_new_tokens=20)   # the same tokens on every rank
    logits = model(**inputs).logits      # real on the rank that ran the head, meta elsewhere
    logits = bigload.distributed.gather(model, logits)     # ... or real everywhere

Modules: ``group`` (the process group), ``agree`` (versions, checkpoint, plan, memory),
``lockstep`` (who holds which value; code between units), ``units`` (hooks around units),
``transport`` (tensors between ranks), ``faults`` (a failing rank fails every rank),
``load`` (``bigload.load(path, world=...)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .lockstep import ALL, GHOST
from .units import lockstep, state_of

__all__ = ["gather", "holders", "is_held", "lockstep"]


def holders(model: nn.Module, tensor: Any) -> tuple[int, ...] | None:
    """The ranks that hold ``tensor``'s value (None: every rank; ``()``: no rank known)."""
    state = state_of(model)
    if state is None:
        return None
    found = state.lockstep.holders(tensor)
    if found is ALL:
        return None
    return () if found is GHOST else tuple(sorted(found))


def is_held(model: nn.Module, tensor: Any) -> bool:
    """Whether this rank holds ``tensor``'s value (it is real here, not a meta placeholder)."""
    state = state_of(model)
    return state is None or state.lockstep.holds(tensor)


def gather(model: nn.Module, output: Any) -> Any:
    """``output`` (a tensor, a model output, nested) with every tensor real on every rank:
    broadcast from the rank that holds it. Call it on every rank, with the same output."""
    state = state_of(model)
    if state is None:
        return output
    ls = state.lockstep
    found = [x for x in pytree.tree_leaves(output)
             if isinstance(x, torch.Tensor) and ls.holders(x) is not ALL]
    with lockstep(model, entry="gather"):
        paused = ls.pause()
        try:
            ls.share(found, "bigload.distributed.gather")
        finally:
            if paused:
                ls.resume()
    return output
