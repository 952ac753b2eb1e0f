"""``bigload plan``: the device plan bigload.load would make for a model folder — built on
``meta`` from its config.json, planned over the budgets; no tensor data is read."""

from __future__ import annotations

import argparse
from typing import Any

from .common import HelpFormatter, add_json, add_model_class, add_path, add_planning, dtype_str

EPILOG = """\
examples:
  bigload plan ./llama/                                   # budgets: free memory of this machine
  bigload plan ./llama/ --max-memory 0=20GiB,1=20GiB,cpu=8GiB,disk=100GiB --dtype bfloat16
  bigload plan ./llama/ --max-memory cpu=2GiB             # disk takes the rest (unbounded)
  bigload plan ./llama/ --max-memory cpu=2GiB,disk=0      # refuse disk: DoesNotFitError, exit 1
  bigload plan ./llama/ --strategy sequential --no-split LlamaDecoderLayer
  bigload plan ./llama/ --json > plan.json                # DevicePlan.from_json(...) reads it
  bigload plan meta-llama/Llama-3.1-8B                    # a model id in the local HF cache
"""


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "plan", parents=parents, formatter_class=HelpFormatter, epilog=EPILOG,
        help="where every tensor would go (GPUs, CPU, disk), without loading",
        description="Print the device plan bigload.load would make: the model is built on meta "
                    "from config.json and planned over the budgets; no weights are read.",
    )
    add_path(parser)
    add_planning(parser)
    add_model_class(parser)
    add_json(parser)
    parser.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from bigload import hf

    model, index, config = hf.build_model_skeleton(
        args.path, dtype=args.dtype, model_class=args.model_class)
    dtype = hf.model_dtype(config, index, args.dtype)
    plan = hf.plan_model(model, dtype=dtype, max_memory=args.max_memory, strategy=args.strategy,
                         no_split_module_classes=args.no_split, prefetch=args.prefetch)
    if args.json:
        print(plan.to_json(indent=2))
        return 0
    budgets = "--max-memory" if args.max_memory else "detected (free memory of this machine)"
    print(f"{type(model).__name__} from '{index.root}' at {dtype_str(dtype)}; budgets: {budgets}")
    print(plan)
    return 0
