"""Run the bigload benchmarks side by side with the tools users would pick instead.

    python benchmarks/run.py --quick                                   # smoke test, ~100 MB model
    python benchmarks/run.py --size 1GB --reps 3 --out benchmarks/RESULTS.md
    python benchmarks/run.py --size 1GB --tools raw,safetensors,transformers,accelerate

Every measurement is one fresh process (``benchmarks/_worker.py``); repetitions are interleaved
(rep 1 of every tool, then rep 2, ... with the tool order rotated each rep) and reported as
medians. See benchmarks/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import _bigger_report, _report  # noqa: E402
from benchmarks import _common as C  # noqa: E402

# (tool, mode) pairs per scenario, in the order they appear in the tables
LOADERS = ("bigload", "accelerate", "transformers")
OFFLOADED = ("bigload", "bigload-prefetch", "bigload-noprefetch", "accelerate", "transformers")
MATRIX: dict[str, list[tuple[str, str]]] = {
    "load_cpu": [(t, m) for m in ("warm", "cold") for t in ("raw", "safetensors", *LOADERS)],
    "load_disk": [(t, m) for m in ("warm", "cold") for t in ("raw", *LOADERS)],
    "generate": [(t, "warm") for t in ("bigload-ram", "transformers-ram", *OFFLOADED)]
    + [(t, "evicted") for t in ("raw", "safetensors", *OFFLOADED)],  # floors: read cold
    # GPU machine only (benchmarks/gpu.sh); without CUDA every row reads "n/a (error)"
    "h2d": [("h2d", "warm")],
    "load_cuda": [(t, m) for m in ("warm", "cold") for t in ("raw", "safetensors", *LOADERS)],
    "generate_cuda": [(t, "warm") for t in ("bigload-gpu", "transformers-gpu", *OFFLOADED)],
}
ALL_SCENARIOS = [*MATRIX, "plan"]
ALWAYS = {"h2d"}  # floors that --tools does not filter out
# bigload's default reads one offloaded unit ahead; these rows pin the depth (the worker passes
# BENCH_PREFETCH to bigload.load(prefetch=...): the library reads no environment variable)
TOOL_ENV = {
    "bigload-noprefetch": {"BENCH_PREFETCH": "0"},
    "bigload-prefetch": {"BENCH_PREFETCH": "1"},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cold_cache_works(files) -> bool:
    ranges = C.whole(files)
    for path in files:
        C.fsync(path)
    C.raw_read(files)
    C.evict(ranges)
    frac = C.resident_fraction(ranges)
    shown = "unknown" if frac is None else f"{frac:.1%}"
    log(f"page-cache eviction check: {shown} of the checkpoint resident after eviction")
    return frac is not None and frac < 0.05


def prepare_cache(cold: bool, files) -> None:
    """Cold: drop the checkpoint from the page cache. Otherwise read it all so that it is cached
    (also at the start of an 'evicted' generation run: the worker evicts after loading)."""
    if cold:
        C.evict(C.whole(files))
    else:
        C.raw_read(files)


def run_one(scenario, tool, mode, folder, args) -> dict:
    files = C.checkpoint_files(folder)
    floor = tool in ("raw", "safetensors")
    prepare_cache(mode == "cold" or (floor and mode == "evicted"), files)
    offload_dir = C.WORK_DIR / "offload" / uuid.uuid4().hex[:8]
    offload_dir.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks._worker",
        scenario,
        tool,
        str(folder),
        "--mode",
        mode,
        "--budget",
        str(args.budget),
        "--offload-dir",
        str(offload_dir),
        "--new-tokens",
        str(args.new_tokens),
        "--prompt-len",
        str(args.prompt_len),
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **TOOL_ENV.get(tool, {}),
    }
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=C.REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.timeout
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(C.RESULT_MARKER)]
        if lines:
            result = json.loads(lines[-1][len(C.RESULT_MARKER) :])
        else:
            result = {
                "error": f"worker exited {proc.returncode} without a result: {proc.stderr[-400:]}"
            }
    except subprocess.TimeoutExpired:
        result = {"error": f"timed out after {args.timeout}s"}
    finally:
        shutil.rmtree(offload_dir, ignore_errors=True)
    result.update(scenario=scenario, tool=tool, mode=mode, process_s=time.perf_counter() - t0)
    return result


def selected(args) -> list[tuple[str, str, str]]:
    tools = set(args.tools.split(",")) if args.tools else set()
    out = []
    for scenario in args.scenarios:
        for tool, mode in MATRIX.get(scenario, []):
            picked = tool in ALWAYS or tool in tools or tool.split("-")[0] in tools
            if tools and not picked:
                continue
            if mode in ("cold", "evicted") and not args.cold_ok:
                continue
            out.append((scenario, tool, mode))
    return out


def measure(jobs, folder, args, sink) -> list[dict]:
    results = []
    for rep in range(args.reps):
        for scenario in dict.fromkeys(s for s, _, _ in jobs):
            for mode in dict.fromkeys(m for s, _, m in jobs if s == scenario):
                group = [t for s, t, m in jobs if s == scenario and m == mode]
                k = rep % len(group)
                for tool in group[k:] + group[:k]:  # rotate the order every repetition
                    log(f"rep {rep + 1}/{args.reps} {scenario:9s} {mode:7s} {tool}")
                    r = run_one(scenario, tool, mode, folder, args)
                    r["rep"] = rep
                    log("   " + _report.one_line(r))
                    results.append(r)
                    sink.write(json.dumps(r) + "\n")
                    sink.flush()
    return results


def run_plan_bench(args) -> dict | None:
    script = C.BENCH_DIR / "bench_plan.py"
    if "plan" not in args.scenarios:
        return None
    if not script.is_file():
        return {"error": "benchmarks/bench_plan.py is not there yet"}
    log("plan: running benchmarks/bench_plan.py")
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=C.REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        return {
            "returncode": proc.returncode,
            "stdout": proc.stdout[-6000:],
            "stderr": proc.stderr[-2000:],
        }
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout}s"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="1GB", choices=sorted(C.SIZES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--scenarios",
        default="load_cpu,load_disk,generate,plan",
        help=f"comma-separated, of {','.join(ALL_SCENARIOS)}",
    )
    p.add_argument(
        "--tools",
        default=None,
        help="comma-separated filter, e.g. raw,safetensors,transformers,accelerate "
        "('bigload' also selects bigload-ram, bigload-prefetch and bigload-noprefetch)",
    )
    p.add_argument("--quick", action="store_true", help="~100 MB model, 1 rep: a smoke test")
    p.add_argument("--no-cold", action="store_true", help="skip cold-cache and evicted runs")
    p.add_argument("--out", type=Path, default=C.BENCH_DIR / "RESULTS.md")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument(
        "--render-only",
        type=Path,
        default=None,
        help="rewrite --out from a raw results file (benchmarks/_work/results/), measuring nothing",
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.reps = "100MB", 1
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(ALL_SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {ALL_SCENARIOS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        return render_only(args)
    started = dt.datetime.now(dt.timezone.utc)
    folder = C.make_checkpoint(args.size, log=log)
    files = C.checkpoint_files(folder)
    args.model_bytes = C.total_bytes(files)
    args.budget = args.model_bytes // 2  # max_memory of the fast tier (cpu, or cuda:0)
    args.cold_ok = not args.no_cold and cold_cache_works(files)
    jobs = selected(args)
    results_dir = C.WORK_DIR / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    raw_path = results_dir / f"{started:%Y%m%dT%H%M%S}-{args.size}.jsonl"
    log(f"{len(jobs)} measurements x {args.reps} reps on {folder.name}; raw results: {raw_path}")
    meta = {
        "size": args.size, "reps": args.reps, "model_bytes": args.model_bytes,
        "cold_ok": args.cold_ok, "folder": str(folder), "started": started.isoformat(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "machine": _report.machine_info(), "versions": _report.versions(),
    }  # fmt: skip
    with open(raw_path, "w") as sink:
        sink.write(json.dumps({"meta": meta}) + "\n")
        results = measure(jobs, folder, args, sink)
    plan = run_plan_bench(args)
    write_report(results, plan, meta, args.out)
    return 0


def write_report(results, plan, meta, out: Path) -> None:
    text = _report.render(results, plan=plan, meta=meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text() if out.exists() else ""
    out.write_text(_bigger_report.keep_sections(old, text))  # bigger_than_ram.py's section
    log(f"wrote {out}")


def render_only(args) -> int:
    """Rebuild the report from a raw results file (e.g. after changing the report's layout)."""
    lines = [json.loads(ln) for ln in args.render_only.read_text().splitlines() if ln.strip()]
    meta = next(ln["meta"] for ln in lines if "meta" in ln)
    results = [ln for ln in lines if "meta" not in ln]
    write_report(results, run_plan_bench(args), meta, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
