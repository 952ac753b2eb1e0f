"""bigload: load and run PyTorch models bigger than any one device, every tensor accounted for.

The pipeline, one stage a module, data objects between them::

    factory ──► skeleton ──► sizes ──► plan ──► verify ──► load ──► dispatch
    checkpoint ─► index ──────────────────┘

    with bigload.init_empty_weights():          # skeleton: parameters on meta, ties kept
        model = MyModel(config)
    report = bigload.load_checkpoint_and_dispatch(model, "ckpt/", device_map="auto")

or, for transformers checkpoints, ``model = bigload.load("path/to/folder")``.
Public names are imported lazily so that ``import bigload`` (and the CLI) start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # skeleton and materialisation
    "init_empty_weights": "skeleton",
    "init_on_device": "skeleton",
    "set_module_tensor_to_device": "tensors",
    "materialize": "tensors",
    # devices
    "parse_device": "devices",
    "parse_size": "devices",
    "parse_max_memory": "devices",
    # checkpoints
    "read_index": "checkpoint",
    "CheckpointIndex": "checkpoint",
    "TensorEntry": "checkpoint",
    "CheckpointReader": "checkpoint",
    # sizes, ties, planning
    "compute_module_sizes": "sizes",
    "find_tied_parameters": "ties",
    "retie_parameters": "ties",
    "plan_devices": "plan",
    "DevicePlan": "plan",
    "infer_auto_device_map": "plan",
    "get_balanced_memory": "plan",
    "get_max_memory": "plan",
    "clean_device_map": "plan",
    "check_device_map": "plan",
    # verify and load
    "verify": "preflight",
    "VerifyReport": "preflight",
    "load_checkpoint_in_model": "loader",
    "load_checkpoint_and_dispatch": "loader",
    "LoadReport": "loader",
    # dispatch and offload
    "dispatch_model": "dispatch",
    "cpu_offload": "dispatch",
    "disk_offload": "dispatch",
    "cpu_offload_with_hook": "dispatch",
    "remove_hooks": "dispatch",
    # transformers
    "load": "hf",
}

__all__ = sorted([*_EXPORTS, "errors", "__version__"])


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        if name == "errors":
            return importlib.import_module(".errors", __name__)
        raise AttributeError(f"module 'bigload' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
