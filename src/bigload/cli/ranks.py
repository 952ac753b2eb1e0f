"""``bigload run`` across ranks: launching itself under torchrun (``--nproc``), every rank running
the same calls while only rank 0 prints, and each rank's figures gathered for that print."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def quiet_unless_rank_0(world: Any) -> Iterator[None]:
    """Every rank runs the same calls (a token streamer too); only rank 0 prints."""
    from bigload.distributed.group import launched_rank

    if world is None or launched_rank() == 0:
        yield
        return
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        yield


def launch(args: argparse.Namespace) -> int:
    """``bigload run --nproc N``: the same command on N local ranks, under torchrun."""
    import subprocess

    argv, skip = [], False
    for token in args.argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            argv.append(token)
    if not any(t == "--world" or t.startswith("--world=") for t in argv):
        argv += ["--world", "auto"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "bigload", *argv]
    return subprocess.call(command)


def rank_summaries(out: dict[str, Any]) -> list[dict[str, Any]]:
    """What each rank loaded and its peak memory (gathered on every rank)."""
    import torch.distributed as dist

    report = out["load_report"]
    mine = {"peak_rss_bytes": out["memory"]["peak_rss_bytes"], "loaded": report["loaded"],
            "bytes_per_device": report["bytes_per_device"], "load_seconds": report["seconds"]}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def rank_lines(out: dict[str, Any]) -> list[str]:
    from bigload.devices import format_size

    lines = []
    for rank, r in enumerate(out.get("ranks", [])):
        read = format_size(sum(r["bytes_per_device"].values()))
        lines.append(f"rank {rank}: loaded {r['loaded']} tensors ({read}) in "
                     f"{r['load_seconds']:.2f} s; peak memory (RSS) "
                     f"{format_size(r['peak_rss_bytes'])}")
    return lines
