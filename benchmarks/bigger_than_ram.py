"""Bigger than RAM: run a checkpoint larger than the memory limit inside a memory cgroup, bigload
side by side with transformers and accelerate, against the floors.

    python benchmarks/bigger_than_ram.py --small              # 600 MiB limit, ~15 min, 2 cores
    python benchmarks/bigger_than_ram.py --limit 3GiB --ratio 1.8 --reps 3
    python benchmarks/bigger_than_ram.py --small --bigload-src ../other-tree/src --keep
    python benchmarks/bigger_than_ram.py --render-only benchmarks/_work/results/<stamp>-btr.jsonl

Every measurement is one fresh process in a fresh memory cgroup (v2, else v1; skipped with a
message where this process cannot make one), with the checkpoint dropped from the page cache
first; repetitions are interleaved and reported as medians. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _bigger_report as R  # noqa: E402
from benchmarks import _cgroup as G  # noqa: E402
from benchmarks import _common as C  # noqa: E402


@dataclass(frozen=True)
class Row:
    kind: str  # the worker's: generate | read | load
    checkpoint: str  # "big" (ratio × the limit) | "fits" (fits in the limit)
    in_cgroup: bool
    cache: str  # "cold": checkpoint dropped from the page cache first | "warm": read first
    call: str  # what it runs, for the report


ROWS: dict[str, Row] = {
    "bigload": Row("generate", "big", True, "cold", "`bigload.load(P)` (no budget)"),
    "bigload-budget": Row("generate", "big", True, "cold",
                          '`bigload.load(P, max_memory={"cpu": B, "disk": "50GB"})`'),
    "transformers": Row("generate", "big", True, "cold",
                        '`from_pretrained(P, device_map="auto")` (no budget)'),
    "accelerate": Row("generate", "big", True, "cold",
                      '`load_checkpoint_and_dispatch(device_map="auto", max_memory={"cpu": B})`'),
    "read-1": Row("read", "big", True, "cold", "floor: the disk tier read cold, 1 thread"),
    "read-4": Row("read", "big", True, "cold", "floor: the disk tier read cold, 4 threads"),
    "compute": Row("generate", "big", False, "warm",
                   "floor: all weights in RAM (transformers, device_map=cpu), outside the cgroup"),
    "fits": Row("load", "fits", True, "cold", "`bigload.load(P_fit)` + touch, cold"),
    "fits-warm": Row("load", "fits", True, "warm", "`bigload.load(P_fit)` + touch, warm"),
}
BEFORE = "before"  # rows "<row>@before" run with --before-src, interleaved with the others
TWINNED = ("bigload", "bigload-budget", "fits", "fits-warm")  # rows that run bigload
BUDGET_SHARE = 2 / 3  # CPU budget: of what the limit leaves after the process's own imports
FIT_SHARE = 0.5  # the model that fits: of what the limit leaves after the imports


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 3GiB or 600MiB")
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


# ---------------------------------------------------------------------------------------------
# checkpoints sized from the limit


def shape_for(target_bytes: int) -> C.LlamaShape:
    """A Llama shape of about ``target_bytes`` in bf16: a family by size (the 3 GiB scenario's
    hidden 2560 from 4.5 GB up), then the layer count. Below 1.5 GB the vocabulary is 8000, so
    that the embedding and the head (each the largest unit) stay small next to a small budget."""
    families = [(4.5e9, (2560, 6912, 20, 32000)), (1.5e9, (2048, 5632, 16, 32000)),
                (0.5e9, (1024, 2816, 16, 8000)), (0, (512, 1408, 8, 8000))]
    h, i, heads, vocab = next(f for floor, f in families if target_bytes >= floor)
    one = C.LlamaShape(h, i, 1, heads, heads, vocab_size=vocab)
    two = C.LlamaShape(h, i, 2, heads, heads, vocab_size=vocab)
    per_layer = 2 * (two.param_count() - one.param_count())
    fixed = 2 * one.param_count() - per_layer
    layers = max(2, round((target_bytes - fixed) / per_layer))
    return C.LlamaShape(h, i, layers, heads, heads, vocab_size=vocab)


# ---------------------------------------------------------------------------------------------
# page cache


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w"):
            return True
    except OSError:
        return False


def make_cold(files, method: str) -> float | None:
    """Drop the checkpoint from the page cache; return the fraction still resident."""
    for path in files:
        C.fsync(path)
    if method == "drop_caches":
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    else:
        C.evict(C.whole(files))
    return C.resident_fraction(C.whole(files))


def make_warm(files) -> float | None:
    """Read the checkpoint so that it is cached (charged to this runner's cgroup, not the
    worker's: a warm row measures the tool, not the limit)."""
    C.raw_read(files)
    return C.resident_fraction(C.whole(files))


# ---------------------------------------------------------------------------------------------
# one measurement


def run_one(kind: str, row: str, folder: Path, args, *, in_cgroup: bool, cache: str) -> dict:
    files = C.checkpoint_files(folder)
    resident = make_cold(files, args.cold) if cache == "cold" else make_warm(files)
    offload_dir = C.WORK_DIR / "offload" / uuid.uuid4().hex[:8]
    offload_dir.mkdir(parents=True)
    row, _, tree = row.partition("@")  # "fits@before": the fits row, with --before-src
    src = args.before_src if tree == BEFORE else args.bigload_src
    cmd = [sys.executable, "-m", "benchmarks._bigger_worker", kind, row, str(folder),
           "--budget", str(args.cpu_budget), "--offload-dir", str(offload_dir),
           "--ranges", str(args.ranges_file), "--new-tokens", str(args.new_tokens),
           "--prompt-len", str(args.prompt_len)]
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    group = args.hierarchy.new(args.limit) if in_cgroup else None
    if group is not None:
        env["BENCH_CGROUP"] = str(group.path)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=C.REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=args.timeout, preexec_fn=group.join if group else None)
        result = parse_result(proc)
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {args.timeout}s"}
    finally:
        shutil.rmtree(offload_dir, ignore_errors=True)
    if group is not None:
        result.update(cgroup_peak_bytes=group.peak_bytes(), oom_kills=group.oom_kills())
        if result["oom_kills"] and "error" in result:
            result["error"] = f"killed by the OOM killer ({result.pop('stderr', '')})"
        group.remove()
    result.pop("stderr", None)
    result.update(kind=kind, row=f"{row}@{tree}" if tree else row, cache=cache,
                  resident_before=resident,
                  in_cgroup=in_cgroup, process_s=time.perf_counter() - t0)
    return result


def parse_result(proc: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(C.RESULT_MARKER)]
    if lines:
        return json.loads(lines[-1][len(C.RESULT_MARKER):])
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    # the last lines of stderr that are not progress bars
    said = [ln.strip() for ln in proc.stderr.replace("\r", "\n").splitlines()
            if ln.strip() and not re.search(r"it/s|w/s|%\|", ln)][-3:]
    return {"error": f"worker ended ({how}) without a result: {' / '.join(said)[-300:]}",
            "stderr": f"{how} during: {said[-1][:120] if said else '?'}",
            "returncode": proc.returncode}


# ---------------------------------------------------------------------------------------------
# the run


def prepare(args) -> None:
    """Checkpoints, the process's own memory under the limit, the CPU budget, the disk tier."""
    args.big_shape = shape_for(int(args.ratio * args.limit))
    args.big = C.make_llama_checkpoint(args.big_shape, "btr", log=log)
    args.ranges_file = C.WORK_DIR / "results" / f"disk-tier-{uuid.uuid4().hex[:8]}.json"
    args.idle = measure_idle(args)
    usable = max(args.limit - args.idle_bytes, args.limit // 4)
    args.cpu_budget, args.budget_rule = choose_budget(args, usable)
    log(f"CPU budget {args.cpu_budget:,} bytes ({args.budget_rule})")
    args.fits_shape = shape_for(int(FIT_SHARE * usable))
    if args.baseline_meta:  # the same model that fits as the baseline, to compare its load
        given = args.baseline_meta["fits"]["shape"]
        args.fits_shape = C.LlamaShape(**{f.name: given[f.name] for f in fields(C.LlamaShape)})
    args.fits = C.make_llama_checkpoint(args.fits_shape, "btr-fits", log=log)
    args.probe = probe_disk_tier(args)


def measure_idle(args) -> dict:
    """What a worker's imports leave charged to its cgroup: the median of three idle workers'
    working sets (charge less inactive page cache, as bigload.memory counts it). It varies:
    whoever reads a library first after the cache drop is charged for it."""
    given, args.cpu_budget = args.cpu_budget, 0
    idles = [run_one("idle", "idle", args.big, args, in_cgroup=True, cache="cold")
             for _ in range(3)]
    args.cpu_budget = given
    sets = sorted(r.get("working_set_bytes") or r.get("cgroup_peak_bytes") or 0 for r in idles)
    args.idle_bytes = sets[1]
    log(f"a worker's imports leave {args.idle_bytes / 2**20:.0f} MiB charged to the cgroup "
        f"(median of {[n >> 20 for n in sets]} MiB)")
    return {**idles[0], "idle_working_sets": sets}


def choose_budget(args, usable: int) -> tuple[int, str]:
    if args.cpu_budget is not None:
        return args.cpu_budget, "--cpu-budget"
    if args.baseline_meta:
        return args.baseline_meta["cpu_budget"], f"as in the baseline {args.baseline.name}"
    floor = " (at least a quarter of the limit)" if usable > args.limit - args.idle_bytes else ""
    return (int(BUDGET_SHARE * usable),
            f"2/3 of {usable / 2**20:.0f} MiB, the limit less the imports{floor}")


def probe_disk_tier(args) -> dict:
    """Load as the budgeted bigload row, outside the cgroup, and keep its disk tier's byte
    ranges for the read floors (the whole checkpoint when bigload cannot say)."""
    probe = run_one("probe", "probe", args.big, args, in_cgroup=False, cache="warm")
    if "error" in probe or not probe.get("ranges_bytes"):
        log(f"probe: no disk tier from bigload ({probe.get('error', 'nothing on disk')}); "
            "the read floors read the whole checkpoint")
        args.ranges_file.write_text(json.dumps(
            {str(p): [[0, p.stat().st_size]] for p in C.checkpoint_files(args.big)}))
    return probe


def measure(args, sink) -> list[dict]:
    results = []
    rows = args.rows
    for rep in range(args.reps):
        k = rep % len(rows)
        for row in rows[k:] + rows[:k]:  # rotate the order every repetition
            spec = ROWS[row.partition("@")[0]]
            folder = args.big if spec.checkpoint == "big" else args.fits
            log(f"rep {rep + 1}/{args.reps} {row}")
            r = run_one(spec.kind, row, folder, args, in_cgroup=spec.in_cgroup, cache=spec.cache)
            r["rep"] = rep
            log("   " + R.one_line(r))
            results.append(r)
            sink.write(json.dumps(r) + "\n")
            sink.flush()
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=parse_size, default=parse_size("3GiB"),
                   help="the memory cgroup limit (default 3GiB)")
    p.add_argument("--ratio", type=float, default=1.8, help="checkpoint bytes ÷ limit (1.8)")
    p.add_argument("--small", action="store_true",
                   help="--limit 600MiB: a quick run on a small machine")
    p.add_argument("--cpu-budget", type=parse_size, default=None,
                   help="max_memory['cpu'] of the budgeted rows (default: the baseline's, else "
                        "2/3 of the limit less the memory a worker's imports take)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {','.join(ROWS)}")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--bigload-src", type=Path, default=C.REPO_ROOT / "src",
                   help="the bigload source tree the workers import (default: this tree's src/)")
    p.add_argument("--before-src", type=Path, default=None,
                   help="another bigload tree (e.g. a worktree of an older commit): every bigload "
                        "row also runs with it, as <row>@before, interleaved with the others")
    p.add_argument("--cold", choices=["auto", "drop_caches", "fadvise"], default="auto",
                   help="how to drop the page cache: drop_caches where writable, else "
                        "posix_fadvise/MADV_PAGEOUT over the checkpoint files")
    p.add_argument("--baseline", type=Path, default=None,
                   help="raw results (.jsonl) of an earlier run: the 'before' of the fits "
                        "target; its CPU budget is reused unless --cpu-budget is given")
    p.add_argument("--out", type=Path, default=C.BENCH_DIR / "RESULTS.md",
                   help="the results file whose 'Bigger than RAM' section is (re)written")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    p.add_argument("--render-only", type=Path, default=None,
                   help="rewrite the section from a raw results file, measuring nothing")
    args = p.parse_args(argv)
    if args.small:
        args.limit = parse_size("600MiB")
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    if args.cold == "auto":
        args.cold = "drop_caches" if can_drop_caches() else "fadvise"
    args.bigload_src = args.bigload_src.resolve()
    if args.before_src is not None:
        args.before_src = args.before_src.resolve()
        args.rows += [f"{r}@{BEFORE}" for r in args.rows if r in TWINNED]
    args.baseline_meta = None
    if args.baseline:
        first = json.loads(args.baseline.read_text().splitlines()[0])
        args.baseline_meta = first["meta"]
        for key in ("limit", "ratio"):
            if args.baseline_meta[key] != getattr(args, key) and not args.render_only:
                p.error(f"--baseline {args.baseline} ran with {key} {args.baseline_meta[key]}, "
                        f"not {getattr(args, key)}: compare like with like")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        return render(args.render_only, args)
    args.hierarchy, why = G.find_hierarchy()
    if args.hierarchy is None:
        log(f"skipped: cannot run workers in a memory cgroup here ({why})")
        return 0
    log(f"memory cgroups: {why}; page cache dropped by {args.cold}")
    started = dt.datetime.now(dt.timezone.utc)
    raw = C.WORK_DIR / "results" / f"{started:%Y%m%dT%H%M%S}-btr-{args.limit >> 20}MiB.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    try:
        prepare(args)
        args.calls = {name: row.call for name, row in ROWS.items()}
        meta = R.meta(args, started)
        log(f"{len(args.rows)} rows x {args.reps} reps; raw results: {raw}")
        with open(raw, "w") as sink:
            sink.write(json.dumps({"meta": meta}) + "\n")
            for extra in (args.idle, args.probe):
                sink.write(json.dumps(extra) + "\n")
            measure(args, sink)
    finally:
        if not args.keep:
            for folder in (getattr(args, "big", None), getattr(args, "fits", None)):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                    log(f"deleted {folder} (--keep keeps it)")
    return render(raw, args)


def render(raw: Path, args) -> int:
    lines = [json.loads(ln) for ln in raw.read_text().splitlines() if ln.strip()]
    meta = next(ln["meta"] for ln in lines if "meta" in ln)
    results = [ln for ln in lines if "meta" not in ln]
    baseline = None
    if args.baseline:
        baseline = [json.loads(ln) for ln in args.baseline.read_text().splitlines() if ln.strip()]
    section = R.render(results, meta, raw=raw, baseline=baseline)
    R.write_section(args.out, section)
    print(section)
    log(f"wrote the 'Bigger than RAM' section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
