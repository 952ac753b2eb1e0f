"""``bigload plan``: the device plan bigload.load would make for a model folder — built on
``meta`` from its config.json, planned over the budgets; no tensor data is read."""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    HelpFormatter,
    add_json,
    add_model_class,
    add_path,
    add_planning,
    add_world,
    budgets_arg,
    dtype_str,
)

EPILOG = """\
examples:
  bigload plan ./llama/                                   # budgets: free memory of this machine
  bigload plan ./llama/ --max-memory 0=20GiB,1=20GiB,cpu=8GiB,disk=100GiB --dtype bfloat16
  bigload plan ./llama/ --max-memory cpu=2GiB             # disk takes the rest (unbounded)
  bigload plan ./llama/ --max-memory cpu=2GiB,disk=0      # refuse disk: DoesNotFitError, exit 1
  bigload plan ./llama/ --strategy sequential --no-split LlamaDecoderLayer
  bigload plan ./llama/ --json > plan.json                # DevicePlan.from_json(...) reads it
  bigload plan meta-llama/Llama-3.1-8B                    # a model id in the local HF cache
  bigload plan ./llama-405b/ --world 4 --max-memory 0=80GiB,1=80GiB,2=80GiB,3=80GiB,4=80GiB,\
      5=80GiB,6=80GiB,7=80GiB,cpu=1TiB                     # 4 ranks of 8 GPUs: stages per rank
  bigload plan ./llama/ --world 2 --max-memory cpu=4GiB --max-memory cpu=12GiB   # per rank
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
    add_world(parser, auto=False)
    add_model_class(parser)
    add_json(parser)
    parser.set_defaults(func=execute, parser=parser)


def execute(args: argparse.Namespace) -> int:
    from bigload import hf

    model, index, config = hf.build_model_skeleton(
        args.path, dtype=args.dtype, model_class=args.model_class)
    dtype = hf.model_dtype(config, index, args.dtype)
    world = args.world or 1
    plan = hf.plan_model(model, dtype=dtype, max_memory=budgets_arg(args, world),
                         strategy=args.strategy, no_split_module_classes=args.no_split,
                         prefetch=args.prefetch, world=world)
    if args.json:
        print(plan.to_json(indent=2))
        return 0
    budgets = "--max-memory" if args.max_memory else "detected (free memory of this machine)"
    if world > 1 and not args.max_memory:
        budgets += ", the same for every rank"
    print(f"{type(model).__name__} from '{index.root}' at {dtype_str(dtype)}; budgets: {budgets}")
    print(plan)
    return 0
