"""``bigload plan``: the device plan bigload.load would make for a model folder — built on
``meta`` from its config.json, planned over the budgets; no tensor data is read."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from .common import (
    HelpFormatter,
    absent_devices,
    add_json,
    add_model_class,
    add_path,
    add_planning,
    add_world,
    budgets_of,
    dtype_str,
    model_folder,
    with_budget_words,
)

EPILOG = """\
examples:
  bigload plan                                            # the default model, this machine
  bigload plan ./llama/                                   # budgets: free memory of this machine
  bigload plan ./llama/ --max-memory cpu=2GiB             # disk takes the rest (unbounded)
  bigload plan ./llama/ --max-memory cpu=2GiB,disk=0      # refuse disk: DoesNotFitError, exit 1
  bigload plan ./llama/ --max-memory 0=20GiB,1=20GiB,cpu=8GiB,disk=100GiB --dtype bfloat16 \\
      --for-other-machine                                 # GPUs this machine does not have
  bigload plan ./llama/ --strategy sequential --no-split LlamaDecoderLayer
  bigload plan ./llama/ --json > plan.json                # DevicePlan.from_json(...) reads it
  bigload plan meta-llama/Llama-3.1-8B                    # a model id in the local HF cache
  bigload plan ./llama-405b/ --world 4 --max-memory 0=80GiB,1=80GiB,2=80GiB,3=80GiB,4=80GiB,\
      5=80GiB,6=80GiB,7=80GiB,cpu=1TiB --for-other-machine   # 4 ranks of 8 GPUs each
  bigload plan ./llama/ --world 2 --max-memory cpu=4GiB --max-memory cpu=12GiB   # per rank

Budgets that name a device this machine does not have (0=20GiB on a machine without a GPU) are
refused, naming it, unless --for-other-machine says that the plan is for another machine; the
output then says so (a note in the plan, also in --json). The header shows each budget and where
it came from: your --max-memory, or what was measured here.
"""


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "plan", parents=parents, formatter_class=HelpFormatter, epilog=EPILOG,
        help="where every tensor would go (GPUs, CPU, disk), without loading",
        description="Print the device plan bigload.load would make: the model is built on meta "
                    "from config.json and planned over the budgets; no weights are read.",
    )
    add_path(parser, "model folder (config.json + weights) or model id")
    add_planning(parser)
    parser.add_argument("--for-other-machine", action="store_true",
                        help="plan for devices this machine does not have (budgets such as "
                             "0=20GiB without a GPU here); the output says so")
    add_world(parser, auto=False)
    add_model_class(parser)
    add_json(parser)
    parser.set_defaults(func=execute, parser=parser)


def execute(args: argparse.Namespace) -> int:
    from bigload import hf
    from bigload.errors import DeviceError

    absent = absent_devices(args.max_memory)
    if absent and not args.for_other_machine:
        raise DeviceError("; ".join(absent) + ". To plan for a machine that has it, add "
                          "--for-other-machine; to plan for this one, budget the devices it has "
                          "(e.g. --max-memory cpu=8GiB,disk=100GiB).")
    folder = model_folder(args.path)
    model, index, config = hf.build_model_skeleton(
        folder, dtype=args.dtype, model_class=args.model_class)
    dtype = hf.model_dtype(config, index, args.dtype)
    world = args.world or 1
    plan = hf.plan_model(model, dtype=dtype, max_memory=budgets_of(args, world),
                         strategy=args.strategy, no_split_module_classes=args.no_split,
                         prefetch=args.prefetch, world=world)
    if absent:
        plan = replace(plan, notes=(*plan.notes, "planned for another machine: " + "; ".join(
            absent)))
    if args.json:
        print(plan.to_json(indent=2))
        return 0
    print(f"{type(model).__name__} from '{index.root}' at {dtype_str(dtype)}")
    if absent:
        print("PLANNED FOR ANOTHER MACHINE: " + "; ".join(absent))
    print(with_budget_words(plan, args.max_memory))
    return 0
