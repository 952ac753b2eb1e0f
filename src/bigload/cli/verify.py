"""``bigload verify``: a model folder's model (built on ``meta`` from config.json) against its
checkpoint — missing, unexpected, mismatched, tied — read from headers; exit 1 on problems."""

from __future__ import annotations

import argparse
from typing import Any

from .common import HelpFormatter, add_json, add_model_class, add_path, model_folder, print_json

EPILOG = """\
examples:
  bigload verify                         # the default model (all-MiniLM-L6-v2)
  bigload verify ./llama/                # exit 0: every tensor of the model is in the checkpoint
  bigload verify ./my-finetune/          # exit 1: lists what is missing, unexpected, mismatched
  bigload verify ./llama/ --json | jq .missing
  bigload verify ./ckpt/ --model-class LlamaForCausalLM   # config.json names no architecture
  bigload verify meta-llama/Llama-3.1-8B # a model id in the local HF cache (nothing downloaded)

The key renames transformers applies (_checkpoint_conversion_mapping) are applied, as bigload.load
does. A "Cannot copy out of meta tensor" elsewhere is a missing tensor here.
"""


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "verify", parents=parents, formatter_class=HelpFormatter, epilog=EPILOG,
        help="model vs checkpoint: missing, unexpected, mismatched, tied",
        description="Compare the model a folder's config.json describes with its checkpoint, "
                    "from headers only. Exit 0 when they match, 1 when there are problems.",
    )
    add_path(parser, "model folder (config.json + weights) or model id")
    add_model_class(parser)
    add_json(parser)
    parser.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from bigload import hf

    model, index, _config = hf.build_model_skeleton(model_folder(args.path),
                                                    model_class=args.model_class)
    report = hf.verify_model(model, index)
    consequences = at_load(report)
    if args.json:
        print_json({"ok": report.ok, **report.to_dict(), "at_load": consequences})
    else:
        print(report)
        print("\n".join(consequences) if consequences else "ok: bigload.load would fill every "
              "tensor from the checkpoint")
    return 0 if report.ok else 1


def at_load(report: Any) -> list[str]:
    """What bigload.load (missing='init', unexpected='warn') would do with these problems."""
    lines = []
    if report.missing:
        lines.append(
            f"{len(report.missing)} tensor(s) would be left on meta: bigload.load initialises "
            "them with the model's _init_weights (missing='init'); pass --missing error to "
            "refuse")
    if report.unexpected:
        lines.append(f"{len(report.unexpected)} checkpoint tensor(s) would be ignored by "
                     "bigload.load (a warning is logged)")
    if report.shape_mismatches or report.dtype_mismatches or report.meta_nonpersistent:
        lines.append("bigload.load would refuse to load (nothing loaded): the model's config "
                     "does not describe this checkpoint")
    return lines
