"""A separate process for test_offload_folder.py: loads a checkpoint whose disk tensors must be
converted into an offload folder, and prints one JSON line per load.

    python offload_worker.py CHECKPOINT EXPECTED.pt FOLDER... [--slow S] [--barrier DIR --name N]
    python offload_worker.py CHECKPOINT EXPECTED.pt FOLDER... --as-nobody

``--slow`` sleeps S seconds before each converted tensor (a long write to kill); ``--barrier``
starts each load together with the other process that uses DIR; ``--as-nobody`` loads once as
root (every module imported), then drops to uid/gid 65534 and reports each load's error.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import bigload.offload.folder as folder_module
from bigload import init_empty_weights, load_checkpoint_and_dispatch
from bigload.errors import BigloadError
from conftest import NestedBlocksModel

DISK_LAYERS = {"embed": "cpu", "layers": "disk", "norm": "cpu"}


def load(checkpoint: str, folder: str) -> torch.nn.Module:
    with init_empty_weights():
        model = NestedBlocksModel()
    return load_checkpoint_and_dispatch(model, checkpoint, device_map=DISK_LAYERS,
                                        offload_folder=folder)


def slow_down(seconds: float) -> None:
    real = folder_module._produce

    def slow(item, digests):  # noqa: ANN001, ANN202
        time.sleep(seconds)
        return real(item, digests)

    folder_module._produce = slow


def barrier(folder: Path, step: str, name: str, parties: int = 2) -> None:
    (folder / f"{step}.{name}").touch()
    deadline = time.monotonic() + 120
    while len(list(folder.glob(f"{step}.*"))) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other process never reached {step}")
        time.sleep(0.005)


def as_nobody(args: argparse.Namespace) -> None:
    load(args.checkpoint, args.warm_up)  # imports every module the load needs, as root
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    for folder in args.folders:
        try:
            load(args.checkpoint, folder)
            print(json.dumps({"folder": folder, "error": None}), flush=True)
        except BigloadError as err:
            print(json.dumps({"folder": folder, "error": type(err).__name__,
                              "message": str(err)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("expected")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--barrier", type=Path)
    parser.add_argument("--name", default="")
    parser.add_argument("--as-nobody", action="store_true")
    parser.add_argument("--warm-up")
    args = parser.parse_args()
    if args.as_nobody:
        return as_nobody(args)
    if args.slow:
        slow_down(args.slow)
    expected = torch.load(args.expected)
    for step, folder in enumerate(args.folders):
        if args.barrier is not None:
            barrier(args.barrier, str(step), args.name)
        model = load(args.checkpoint, folder)
        with torch.no_grad():
            equal = torch.equal(model(expected["x"]), expected["y"])
        print(json.dumps({"folder": folder, "written": model.bigload_report.bytes_written,
                          "equal": equal}), flush=True)


if __name__ == "__main__":
    main()
