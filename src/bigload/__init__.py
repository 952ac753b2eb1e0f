"""bigload: load and run PyTorch models bigger than any one device, every tensor accounted for.

The pipeline, one stage a module, data objects between them; the plan is the one hand-off::

    factory ──► skeleton ──► sizes ──► plan ──► verify ──► load ──► dispatch
    checkpoint ─► index ──────────────────┘

    with bigload.init_empty_weights():          # skeleton: parameters on meta, ties kept
        model = MyModel(config)
    index = bigload.read_index("ckpt/")
    plan = bigload.plan_devices(model, index=index, max_memory={"cpu": "8GiB"})
    report = bigload.verify(model, index, plan=plan)
    loaded = bigload.load_weights(model, index, plan, verified=report)
    bigload.dispatch(model, plan, loaded.store)

``load_checkpoint_and_dispatch`` (accelerate's names, ``bigload.compat.accelerate``) is that
composition in one call; for transformers checkpoints, ``model = bigload.load("path/to/folder")``.

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
    "plan_from_device_map": "plan",
    "DevicePlan": "plan",
    "PlannedUnit": "plan",
    # verify, load, dispatch: the stages
    "verify": "preflight",
    "VerifyReport": "preflight",
    "load_weights": "loader",
    "place_weights": "place",
    "LoadOptions": "loader",
    "Loaded": "loader",
    "LoadReport": "report",
    "OffloadStore": "offload",
    "dispatch": "runtime",
    "remove_hooks": "runtime",
    # accelerate's API, at the edge
    "set_module_tensor_to_device": "compat.accelerate",
    "infer_auto_device_map": "compat.accelerate",
    "get_balanced_memory": "compat.accelerate",
    "get_max_memory": "compat.accelerate",
    "clean_device_map": "compat.accelerate",
    "check_device_map": "compat.accelerate",
    "load_checkpoint_in_model": "compat.accelerate",
    "load_checkpoint_and_dispatch": "compat.accelerate",
    "dispatch_model": "compat.accelerate",
    "cpu_offload": "compat.accelerate",
    "disk_offload": "compat.accelerate",
    "cpu_offload_with_hook": "compat.accelerate",
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
