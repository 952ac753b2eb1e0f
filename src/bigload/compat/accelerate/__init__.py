"""accelerate's big-model API on top of bigload's stages: the names, positional orders, integer
device keys and arguments users of accelerate write, translated into plans and options once.

This module is the only place that keeps state between two calls: accelerate loads with
``load_checkpoint_in_model`` and dispatches later with ``dispatch_model``, so the store of
offloaded tensors a load filled is remembered for the model in ``_STORES`` (a weak mapping: it
goes with the model) and handed to ``dispatch_model``. Differences from accelerate, by design,
are listed in docs/accelerate.md (never a meta tensor left behind; budgets are kept).
"""

from __future__ import annotations

from .loading import load_checkpoint_and_dispatch, load_checkpoint_in_model
from .maps import (
    check_device_map,
    clean_device_map,
    get_balanced_memory,
    get_max_memory,
    infer_auto_device_map,
)
from .offload import (
    UserCpuOffloadHook,
    cpu_offload,
    cpu_offload_with_hook,
    disk_offload,
    dispatch_model,
)
from .tensors import set_module_tensor_to_device

__all__ = [
    "UserCpuOffloadHook",
    "check_device_map",
    "clean_device_map",
    "cpu_offload",
    "cpu_offload_with_hook",
    "disk_offload",
    "dispatch_model",
    "get_balanced_memory",
    "get_max_memory",
    "infer_auto_device_map",
    "load_checkpoint_and_dispatch",
    "load_checkpoint_in_model",
    "set_module_tensor_to_device",
]
