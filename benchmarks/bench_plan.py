"""Plan a ~100e9-parameter meta model: bigload.plan_devices vs accelerate.infer_auto_device_map.

    python benchmarks/bench_plan.py [--blocks 1000 --hidden 2880 --runs 3]

Prints a markdown table of the median wall time of each planner and the ratio to accelerate.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from bigload import infer_auto_device_map, plan_devices


class Block(nn.Module):
    """12·h² parameters: attention projections (4·h²) and a 4× MLP (8·h²)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
        self.up = nn.Linear(hidden, 4 * hidden, bias=False)
        self.down = nn.Linear(4 * hidden, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)


class Model(nn.Module):
    def __init__(self, blocks: int, hidden: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)


def median_seconds(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def summary(device_map: dict) -> str:
    counts = Counter(str(v) for v in device_map.values())
    return ", ".join(f"{k}: {n}" for k, n in counts.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # accelerate warns that GPU 0 and 1 are not on this machine

    start = time.perf_counter()
    with torch.device("meta"):
        model = Model(args.blocks, args.hidden, args.vocab)
    built = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    max_memory = {0: "40GiB", 1: "40GiB", "cpu": "60GiB"}  # bf16 ≈ 200 GB: GPUs + CPU + disk
    common = {"no_split_module_classes": ["Block"], "dtype": torch.bfloat16}

    rows = []
    try:
        from accelerate.utils import infer_auto_device_map as accelerate_infer
    except ImportError:
        accelerate_infer = None
    base = None
    if accelerate_infer is not None:
        base, dm = median_seconds(
            lambda: accelerate_infer(model, dict(max_memory), **common), args.runs
        )
        rows.append(("accelerate.infer_auto_device_map", base, summary(dm)))
    seconds, plan = median_seconds(
        lambda: plan_devices(
            model, max_memory=max_memory, strategy="sequential", headroom_bytes=0, **common
        ),
        args.runs,
    )
    rows.append(('bigload.plan_devices(strategy="sequential")', seconds, summary(plan.device_map)))
    seconds, plan = median_seconds(
        lambda: plan_devices(model, max_memory=max_memory, **common), args.runs
    )
    rows.append(('bigload.plan_devices(strategy="auto")', seconds, summary(plan.device_map)))
    seconds, dm = median_seconds(
        lambda: infer_auto_device_map(model, max_memory, **common), args.runs
    )
    rows.append(("bigload.infer_auto_device_map", seconds, summary(dm)))

    print(
        f"model: {params / 1e9:.1f}e9 parameters, {args.blocks} blocks, hidden {args.hidden}, "
        f"built on meta in {built:.1f} s; max_memory {max_memory} + disk, bf16\n"
    )
    print(f"| planner | median of {args.runs} (s) | × accelerate | device map keys per device |")
    print("|---|---:|---:|---|")
    for name, secs, where in rows:
        ratio = f"{secs / base:.3f}" if base else "n/a"
        print(f"| {name} | {secs:.3f} | {ratio} | {where} |")


if __name__ == "__main__":
    main()
