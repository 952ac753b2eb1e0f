"""A model across torch.distributed ranks on this machine (gloo, loopback), against one process.

    python benchmarks/bench_ranks.py [--size 1GB] [--ranks 2] [--new-tokens 16] [--out FILE]

Load (cold page cache): per rank, the bytes read from disk (``read_bytes`` of /proc/self/io
across the load), its share (the bytes of its stage in the plan), whether it holds any tensor
of another rank's stage, its peak RSS and load time; the same for one process loading the
whole model. Decode (warm): the median time between generated tokens (greedy) for one process
(1 thread), bigload over the ranks (1 thread each: a pipeline decodes its stages one after the
other, so that is the same compute), and transformers' ``DistributedConfig(pp_size=N)`` over
the same ranks, with the tokens compared. Every
measurement runs in fresh processes (ranks are launched as torchrun would: RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment); a failure is reported, never filled in.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common as C  # noqa: E402

BIG = "1TB"  # as much memory as a rank likes: the stages follow the balance, not the budget


def fmt(nbytes: float) -> str:
    from bigload.devices import format_size

    return format_size(nbytes)


# --- in a worker process -----------------------------------------------------------------------
def _io(field: str) -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _held(model) -> tuple[int, int, int]:
    """(bytes of real persistent tensors, of those another rank's stage holds, meta tensors)."""
    from bigload.slots import iter_slots, tensor_groups

    plan = model.bigload_plan
    real = foreign = meta = 0
    for group in tensor_groups(s for s in iter_slots(model) if s.persistent):
        tensor = group[0].tensor
        if tensor.device.type == "meta":
            meta += 1
            continue
        nbytes = tensor.numel() * tensor.element_size()
        real += nbytes
        if not any(plan.holds(s.fqn) for s in group):
            foreign += nbytes
    return real, foreign, meta


def _load(folder: str, world: bool):
    import bigload

    if world:
        return bigload.load(folder, world="auto", max_memory={"cpu": BIG}, timeout=600)
    return bigload.load(folder, max_memory={"cpu": BIG})


def worker_load(folder: str, world: bool, result: dict) -> None:
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import bigload.hf  # noqa: F401

    if world:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        dist.barrier()
    _reset_peak()
    read0, start = _io("read_bytes"), time.perf_counter()
    model = _load(folder, world)
    result["load_s"] = time.perf_counter() - start
    result["read_bytes"] = _io("read_bytes") - read0
    result["peak_rss_bytes"] = _peak()
    view = model.bigload_plan
    result["share_bytes"] = sum(u.size_bytes for u in view.local_units)
    result["units"] = [u.name for u in view.local_units if u.rank == view.rank]
    result["loaded"] = list(model.bigload_report.loaded)
    result["real_bytes"], result["foreign_bytes"], result["meta_tensors"] = _held(model)


def worker_generate(folder: str, world: bool, threads: int, args, result: dict) -> None:
    import torch
    from transformers import StoppingCriteriaList

    from benchmarks._worker import TokenClock

    torch.set_num_threads(threads)
    if args.tool == "transformers-pp":
        model = _transformers_pp(folder, args.ranks)
    else:
        model = _load(folder, world)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    clock = TokenClock()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList([clock]))
        result["generate_s"] = time.perf_counter() - start
    result["tokens"] = out[0, args.prompt_len:].tolist()
    result["decode_step_s"] = statistics.median(clock.decode_steps())
    result["peak_rss_bytes"] = _peak()


def _transformers_pp(folder: str, ranks: int):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, distributed_config=DistributedConfig(pp_size=ranks)).eval()


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["load", "generate"])
    parser.add_argument("folder")
    parser.add_argument("--tool", default="bigload")
    parser.add_argument("--world", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    args = parser.parse_args(argv)
    result: dict = {"rank": int(os.environ.get("RANK", "0"))}
    try:
        if args.kind == "load":
            worker_load(args.folder, args.world, result)
        else:
            worker_generate(args.folder, args.world, args.threads, args, result)
    except BaseException as err:
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()[-3000:]
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return 0


# --- the runner --------------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, folder: Path, ranks: int, *extra: str, threads: int = 1,
           timeout: float = 1800) -> list[dict]:
    """``ranks`` worker processes (1: one process, no process group); their results."""
    port = _port()
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                              os.environ.get("PYTHONPATH", "")])}
        if ranks > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, "-m", "benchmarks.bench_ranks", "--worker", kind, str(folder),
                   f"--threads={threads}", f"--ranks={ranks}", *extra]
        if ranks > 1 and "--tool=transformers-pp" not in extra:
            command.append("--world")
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        line = next((x for x in out.splitlines() if x.startswith("BENCH_JSON ")), None)
        results.append(json.loads(line[11:]) if line else {"error": f"no result: {err[-2000:]}"})
    return results


def evict(folder: Path) -> float | None:
    """Drop the checkpoint from the page cache; the fraction still resident after."""
    ranges = C.whole(C.checkpoint_files(folder))
    C.evict(ranges)
    return C.resident_fraction(ranges)


def run(args: argparse.Namespace) -> str:
    folder = C.make_checkpoint(args.size)
    total = C.total_bytes(C.checkpoint_files(folder))
    params = C.SIZES[args.size].param_count() / 1e9
    lines = [f"# bigload across ranks: {args.size} Llama ({params:.2f}B parameters, bf16, "
             f"{fmt(total)} of safetensors), {args.ranks} ranks (gloo, loopback) on one "
             f"machine ({os.cpu_count()} cores)", ""]
    if "load" not in args.skip:
        lines += _loads(folder, args)
    if "decode" not in args.skip:
        lines += _decodes(folder, args)
    return "\n".join(lines) + "\n"


def _loads(folder: Path, args: argparse.Namespace) -> list[str]:
    """One process, cold; the ranks together, all cold; then each rank alone cold (the other
    ranks' tensors cached first), so that its reads are its own: on one machine the ranks
    share the page cache, and the kernel's read-ahead for one rank fetches its neighbours'."""
    out = ["## Load, cold page cache", "",
           "| who | read from disk | its share | read / share | holds another rank's | "
           "peak RSS | load s |", "|---|---:|---:|---:|---:|---:|---:|"]
    evict(folder)
    out += _rows("one process", launch("load", folder, 1))
    evict(folder)
    together = launch("load", folder, args.ranks)
    out += _rows(f"{args.ranks} ranks at once, rank", together)
    if any("error" in r for r in together):
        return out
    total = sum(r["read_bytes"] for r in together)
    out.append(f"| {args.ranks} ranks at once, together | {fmt(total)} | | | | | |")
    ranges = _ranges_by_rank(folder, together)
    for rank in range(args.ranks):
        evict(folder)
        _read(ranges, skip=rank)
        alone = launch("load", folder, args.ranks)
        out += _rows("alone: rank", [alone[rank]])
    return out + ["", "A rank's share is the bytes of its stage in the plan (its units, the "
                  "tensors every rank reads, a tied tensor it shares with another stage). "
                  "*alone*: that rank cold, the other ranks' tensors already in the page cache "
                  "(on one machine the ranks share it, and read-ahead for one rank fetches its "
                  "neighbours' bytes); the target is read / share within 10% and nothing of "
                  "another rank's stage held.", ""]


def _rows(label: str, results: list[dict]) -> list[str]:
    rows = []
    for r in results:
        who = f"{label} {r.get('rank')}" if label.endswith("rank") else label
        if "error" in r:
            rows.append(f"| {who} | n/a ({r['error'][:80]}) | | | | | |")
            continue
        ratio = r["read_bytes"] / r["share_bytes"] if r["share_bytes"] else float("nan")
        rows.append(f"| {who} | {fmt(r['read_bytes'])} | {fmt(r['share_bytes'])} | "
                    f"{ratio:.3f} | {fmt(r['foreign_bytes'])} | {fmt(r['peak_rss_bytes'])} "
                    f"| {r['load_s']:.2f} |")
    return rows


def _ranges_by_rank(folder: Path, results: list[dict]) -> list[dict[Path, list]]:
    """Per rank, the byte ranges of the checkpoint tensors it loaded."""
    where = {name: (path, span) for path in C.checkpoint_files(folder)
             for name, span in C.safetensors_ranges(path).items()}
    out = []
    for r in results:
        by_file: dict[Path, list] = {}
        for name in r["loaded"]:
            if name in where:
                path, span = where[name]
                by_file.setdefault(path, []).append(span)
        out.append(by_file)
    return out


def _read(ranges: list[dict[Path, list]], *, skip: int) -> None:
    """Bring every rank's tensors but ``skip``'s into the page cache."""
    for rank, by_file in enumerate(ranges):
        if rank == skip:
            continue
        for path, spans in by_file.items():
            with open(path, "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead
                for offset, length in spans:
                    os.pread(f.fileno(), length, offset)


def _decodes(folder: Path, args: argparse.Namespace) -> list[str]:
    extra = [f"--new-tokens={args.new_tokens}", f"--prompt-len={args.prompt_len}"]
    runs = [("bigload, one process, 1 thread", 1, 1, "bigload"),
            (f"bigload, {args.ranks} ranks, 1 thread each", args.ranks, 1, "bigload"),
            (f"transformers pp_size={args.ranks}, 1 thread each", args.ranks, 1,
             "transformers-pp")]
    found: dict[str, list[list[dict]]] = {label: [] for label, *_ in runs}
    for rep in range(args.reps):  # interleaved: rep 1 of every run, then rep 2, ...
        for label, ranks, threads, tool in runs[rep % len(runs):] + runs[:rep % len(runs)]:
            found[label].append(launch("generate", folder, ranks, *extra, f"--tool={tool}",
                                       threads=threads))
    out = ["## Decode, warm", "", f"Greedy, {args.prompt_len} prompt tokens, "
           f"{args.new_tokens} new; the median time between tokens (median over {args.reps} "
           "runs, min–max in brackets; a run over ranks counts its slowest rank).", "",
           "| run | decode step | generate s | same tokens | peak RSS (each rank) |",
           "|---|---:|---:|---|---:|"]
    reference = None
    for label, *_ in runs:
        good = [rs for rs in found[label] if not any("error" in r for r in rs)]
        if not good:
            errors = [r["error"] for rs in found[label] for r in rs if "error" in r]
            out.append(f"| {label} | n/a ({errors[0][:100]}) | | | |")
            continue
        steps = [max(r["decode_step_s"] for r in rs) for rs in good]
        totals = [max(r["generate_s"] for r in rs) for rs in good]
        reference = reference or good[0][-1]["tokens"]
        same = all(r["tokens"] == reference for rs in good for r in rs)
        peaks = ", ".join(fmt(r["peak_rss_bytes"]) for r in good[-1])
        out.append(f"| {label} | {statistics.median(steps) * 1000:.1f} ms "
                   f"({min(steps) * 1000:.1f}–{max(steps) * 1000:.1f}) | "
                   f"{statistics.median(totals):.2f} | {'yes' if same else 'NO'} | {peaks} |"
                   + (f" ({len(good)}/{len(found[label])} ok)" if len(good) < args.reps else ""))
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GB", choices=sorted(C.SIZES))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip", choices=["load", "decode"], action="append", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    text = run(args)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
