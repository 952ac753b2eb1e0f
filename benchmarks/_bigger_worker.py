"""One measurement of ``bigger_than_ram.py`` in its own process (the runner puts it in a fresh
memory cgroup): ``python -m benchmarks._bigger_worker KIND ROW CKPT [...]``.

Prints one line starting with ``BENCH_JSON `` holding a JSON object; a failure is reported as
``{"error": ...}``, never as a number. A process the OOM killer kills prints nothing: the runner
reads the kill from the cgroup.

Kinds
  idle       imports only (the process's own memory, charged before any weight)
  generate   load the checkpoint as ROW does, one timed forward of the prompt, greedy decoding;
             per token: time and this process's bytes read from storage (/proc/self/io)
  read       the disk tier's byte ranges (--ranges JSON) read cold into reused buffers with
             ROW's thread count (read-1, read-4): the read floor
  load       load a model that fits (bigload.load, no budget) and touch every page of it
  probe      load as the budgeted bigload row and write the disk tier's byte ranges (--ranges)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _common as C  # noqa: E402
from benchmarks import _worker as W  # noqa: E402

NO_SPLIT = W.NO_SPLIT


def cgroup_charge() -> dict[str, int]:
    """anon / file (page cache) / mapped file bytes charged to this worker's cgroup now, from
    its memory.stat (the runner names the folder in BENCH_CGROUP); {} outside a cgroup."""
    folder = os.environ.get("BENCH_CGROUP")
    if not folder:
        return {}
    keys = {"anon": "anon", "file": "file", "file_mapped": "mapped",  # v2
            "total_rss": "anon", "total_cache": "file", "total_mapped_file": "mapped"}  # v1
    out = {}
    with open(os.path.join(folder, "memory.stat")) as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name in keys:
                out[keys[name]] = int(value)
    return out


def cgroup_working_set() -> int | None:
    """The cgroup's charge less its inactive page cache (what bigload.memory counts as used)."""
    folder = os.environ.get("BENCH_CGROUP")
    if not folder:
        return None
    v2 = os.path.exists(os.path.join(folder, "memory.current"))
    with open(os.path.join(folder, "memory.current" if v2 else "memory.usage_in_bytes")) as f:
        usage = int(f.read())
    inactive = 0
    with open(os.path.join(folder, "memory.stat")) as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name == ("inactive_file" if v2 else "total_inactive_file"):
                inactive = int(value)
    return usage - inactive


def proc_io() -> dict[str, int]:
    """This process's /proc/self/io counters (read_bytes: bytes fetched from storage)."""
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


# ---------------------------------------------------------------------------------------------
# rows: how each tool is asked to load a checkpoint bigger than the memory limit


def _dtype_kwargs(fn) -> dict:
    import torch

    return {"dtype": torch.bfloat16} if W._accepts(fn, "dtype") else {}


def load_bigload(folder, budget, offload_dir):
    """``bigload.load(P)``: no budget, bigload decides from what it detects."""
    import bigload

    return bigload.load(str(folder), **_dtype_kwargs(bigload.load))


def load_bigload_budget(folder, budget, offload_dir):
    import bigload

    return bigload.load(str(folder), max_memory={"cpu": budget, "disk": "50GB"},
                        offload_dir=str(offload_dir), **_dtype_kwargs(bigload.load))


def load_transformers(folder, budget, offload_dir):
    """``from_pretrained(P, device_map="auto")``: no budget, as users write it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.bfloat16, device_map="auto", offload_folder=str(offload_dir))


def load_accelerate(folder, budget, offload_dir):
    """``load_checkpoint_and_dispatch`` with the CPU budget; the rest goes to its offload folder."""
    return W.load_accelerate(folder, "half_disk", budget, offload_dir)


def load_in_ram(folder, budget, offload_dir):
    """The compute floor: transformers, everything on the CPU (run outside the cgroup)."""
    return W.load_transformers(folder, "cpu", budget, offload_dir)


LOADERS = {
    "bigload": load_bigload,
    "bigload-budget": load_bigload_budget,
    "transformers": load_transformers,
    "accelerate": load_accelerate,
    "compute": load_in_ram,
}


def import_for(row: str) -> None:
    """Imports and thread-pool start-up before the clock (a program pays them once)."""
    if row.startswith("read"):
        return
    tool = {"bigload-budget": "bigload", "fits": "bigload", "fits-warm": "bigload",
            "probe": "bigload", "compute": "transformers", "idle": "accelerate"}.get(row, row)
    W.prepare(tool)
    if row == "idle":
        W.prepare("bigload")


# ---------------------------------------------------------------------------------------------
# measurements


class StepClock:
    """A StoppingCriteria that records, at every generated token, the time and read_bytes."""

    def __init__(self):
        self.stamps: list[float] = []
        self.read: list[int] = []
        self.charges: list[dict[str, int]] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.stamps.append(time.perf_counter())
        self.read.append(proc_io()["read_bytes"])
        self.charges.append(cgroup_charge())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    def read_per_step(self) -> list[int]:
        return [b - a for a, b in zip(self.read, self.read[1:])]


def run_generate(row, folder, args, result):
    import torch
    from transformers import StoppingCriteriaList

    io0 = proc_io()
    t0 = time.perf_counter()
    model = LOADERS[row](folder, args.budget, args.offload_dir)
    result["load_s"] = time.perf_counter() - t0
    io1 = proc_io()
    result["load_read_bytes"] = io1["read_bytes"] - io0["read_bytes"]
    result["load_written_bytes"] = io1["write_bytes"] - io0["write_bytes"]
    describe_placement(model, folder, result)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids)
        result["forward_s"] = time.perf_counter() - t0
        clock = StepClock()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList([clock]))
        result["generate_s"] = time.perf_counter() - t0
    io2 = proc_io()
    steps, reads = clock.steps(), clock.read_per_step()
    result.update(
        tokens=out[0, args.prompt_len:].tolist(),
        decode_steps_s=steps, read_per_step=reads,
        decode_step_s=statistics.median(steps) if steps else None,
        read_per_step_bytes=statistics.median(reads) if reads else None,
        read_bytes=io2["read_bytes"] - io0["read_bytes"],
        written_bytes=io2["write_bytes"] - io0["write_bytes"],
        offload_dir_bytes=C.total_bytes(C.tree_files(args.offload_dir)),
        charges=clock.charges,
        max_anon_bytes=max((c.get("anon", 0) for c in clock.charges), default=None),
        max_mapped_bytes=max((c.get("mapped", 0) for c in clock.charges), default=None),
    )
    import torch

    result["cpu_capability"] = torch.backends.cpu.get_cpu_capability()


def describe_placement(model, folder, result) -> None:
    """Bytes per placement from the model's device map, and the disk tier's checkpoint ranges."""
    dm = W.device_map_of(model)
    result["device_map_known"] = dm is not None
    result["meta_tensors"] = W.meta_tensor_count(model)
    plan = getattr(model, "bigload_plan", None)  # bigload: the budgets it planned with
    if plan is not None:
        result["budgets"] = {str(k): v for k, v in getattr(plan, "budgets", {}).items()}
        result["budget_sources"] = dict(getattr(plan, "budget_sources", {}))
    if dm is None:  # no map (transformers when everything fits one device): where tensors are
        devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
        if len(devices) != 1 or "meta" in devices:
            return
        dm = {"": devices.pop()}
    per: dict[str, int] = {}
    for path in C.checkpoint_files(folder):
        for name, (_, n) in C.safetensors_ranges(path).items():
            where = C.placement_of(name, dm)
            per[where] = per.get(where, 0) + n
    result["bytes_per_placement"] = per
    result["disk_bytes"] = per.get("disk", 0)


def run_probe(folder, args, result):
    model = load_bigload_budget(folder, args.budget, args.offload_dir)
    describe_placement(model, folder, result)
    dm = W.device_map_of(model)
    ranges = C.disk_ranges(folder, dm) if dm else {}
    args.ranges.write_text(json.dumps({str(p): rs for p, rs in ranges.items()}))
    result["ranges_bytes"] = sum(n for rs in ranges.values() for _, n in rs)


def run_read(row, args, result):
    """Read the ranges cold with N threads (pread into one reused 16 MiB buffer per thread)."""
    threads = int(row.split("-")[1])
    spans = [(path, off + i, min(C.READ_CHUNK_BYTES, n - i))
             for path, rs in json.loads(args.ranges.read_text()).items()
             for off, n in rs for i in range(0, n, C.READ_CHUNK_BYTES)]
    fds = {path: os.open(path, os.O_RDONLY) for path in {s[0] for s in spans}}
    done = [0] * threads

    def reader(k: int) -> None:
        buf = bytearray(C.READ_CHUNK_BYTES)
        view = memoryview(buf)
        for path, off, n in spans[k::threads]:
            done[k] += os.preadv(fds[path], [view[:n]], off)

    io0 = proc_io()
    t0 = time.perf_counter()
    workers = [threading.Thread(target=reader, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    result["read_s"] = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    result["bytes"] = sum(done)
    result["read_bytes"] = proc_io()["read_bytes"] - io0["read_bytes"]
    result["gbps"] = result["bytes"] / result["read_s"] / 1e9


def run_load(folder, result):
    import bigload

    io0 = proc_io()
    t0 = time.perf_counter()
    model = bigload.load(str(folder), **_dtype_kwargs(bigload.load))
    result["load_s"] = time.perf_counter() - t0
    result["touch_bytes"] = W.touch_tensors(model)
    result["load_touch_s"] = time.perf_counter() - t0
    result["written_bytes"] = proc_io()["write_bytes"] - io0["write_bytes"]
    describe_placement(model, folder, result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["idle", "generate", "read", "load", "probe"])
    p.add_argument("row")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--budget", type=int, default=0, help="CPU bytes for the budgeted rows")
    p.add_argument("--offload-dir", type=Path, default=None)
    p.add_argument("--ranges", type=Path, default=None, help="JSON: path -> [[offset, length]]")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    args = p.parse_args(argv)
    result: dict = {"kind": args.kind, "row": args.row, "pid": os.getpid()}
    load_at_start = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    t0 = time.perf_counter()
    try:
        import_for(args.row)
        result["import_s"] = time.perf_counter() - t0
        if "bigload" in sys.modules:
            import bigload

            result["bigload_file"] = bigload.__file__
        if args.kind == "idle":
            result["working_set_bytes"] = cgroup_working_set()
            result["charge"] = cgroup_charge()
        elif args.kind == "generate":
            run_generate(args.row, args.checkpoint, args, result)
        elif args.kind == "read":
            run_read(args.row, args, result)
        elif args.kind == "load":
            run_load(args.checkpoint, result)
        elif args.kind == "probe":
            run_probe(args.checkpoint, args, result)
    except BaseException as err:  # noqa: BLE001  report any failure as data, never as a number
        result["error"] = f"{type(err).__name__}: {err}".strip()[:500]
        result["traceback"] = traceback.format_exc()[-3000:]
    result["peak_rss_bytes"] = W.peak_rss_bytes()
    result["wall_s"] = time.perf_counter() - t0
    result["loadavg_1m"] = [load_at_start, os.getloadavg()[0]]
    print(C.RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
