"""``bigger_than_ram.py``'s results as a section of RESULTS.md: setup, medians, floors, targets.

The section sits between two marker comments, so that it can be rewritten in place and that
``run.py`` (which rewrites the rest of the file) keeps it.
"""

from __future__ import annotations

import datetime as dt
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from benchmarks import _common as C
from benchmarks import _report

BEGIN = "<!-- bigger_than_ram: begin (written by benchmarks/bigger_than_ram.py) -->"
END = "<!-- bigger_than_ram: end -->"
GENERATE_ROWS = ("bigload", "bigload-budget", "transformers", "accelerate")
TARGET_ROWS = ("bigload-budget", "bigload")
ERR = "n/a (error)"


def mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.0f} MiB"


def gb(n) -> str:
    return "–" if n is None else f"{n / 1e9:.2f} GB"


def sec(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def times(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def one_line(r: dict) -> str:
    keys = ("load_s", "forward_s", "decode_step_s", "read_per_step_bytes", "disk_bytes",
            "read_s", "gbps", "load_touch_s", "cgroup_peak_bytes", "oom_kills", "written_bytes")
    text = " ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}"
                    for k in keys if r.get(k) is not None)
    return f"error: {r['error'][:200]} {text}" if "error" in r else text


# ---------------------------------------------------------------------------------------------
# run description


def _git(src: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def revision(src: Path) -> str:
    rev = _git(src, "rev-parse", "--short", "HEAD") or "unknown"
    branch = _git(src, "rev-parse", "--abbrev-ref", "HEAD")
    dirty = _git(src, "status", "--porcelain", ".")
    return f"{rev}{f' ({branch})' if branch and branch != 'HEAD' else ''}" + (
        " + uncommitted changes" if dirty else "")


def meta(args, started: dt.datetime) -> dict:
    def shape(s: C.LlamaShape, folder: Path) -> dict:
        files = C.checkpoint_files(folder)
        return {"shape": s.config_kwargs(), "params": s.param_count(), "files": len(files),
                "bytes": C.total_bytes(files)}

    versions = {}
    for pkg in ("torch", "transformers", "accelerate", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "started": started.isoformat(), "argv": sys.argv[1:], "limit": args.limit,
        "ratio": args.ratio, "cpu_budget": args.cpu_budget, "idle_bytes": args.idle_bytes,
        "big": shape(args.big_shape, args.big), "fits": shape(args.fits_shape, args.fits),
        "cgroup": f"{args.hierarchy.version} in {args.hierarchy.parent}", "cold": args.cold,
        "reps": args.reps, "rows": args.rows, "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len, "bigload_src": str(args.bigload_src),
        "bigload_rev": revision(args.bigload_src), "versions": versions,
        "before_src": str(args.before_src) if args.before_src else None,
        "before_rev": revision(args.before_src) if args.before_src else None,
        "machine": _report.machine_info(), "calls": args.calls,
        "budget_rule": args.budget_rule,
    }


# ---------------------------------------------------------------------------------------------
# aggregation


class Cell:
    """All repetitions of one row."""

    def __init__(self, runs: list[dict]):
        self.runs = runs
        self.ok = [r for r in runs if "error" not in r]

    def med(self, key, *, failed_too: bool = False):
        runs = self.runs if failed_too else self.ok
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    def total(self, key) -> int:
        return sum(r.get(key) or 0 for r in self.runs)

    def count(self) -> str:
        return f"{len(self.ok)}/{len(self.runs)}"

    def errors(self) -> list[str]:
        return list(dict.fromkeys(r["error"] for r in self.runs if "error" in r))


def cells(results) -> dict[str, Cell]:
    rows: dict[str, list[dict]] = {}
    for r in results:
        if "rep" in r:
            rows.setdefault(r["row"], []).append(r)
    return {k: Cell(v) for k, v in rows.items()}


def reference_tokens(cs):
    c = cs.get("compute")
    return c.ok[0]["tokens"] if c and c.ok and "tokens" in c.ok[0] else None


def same_tokens(c: Cell, ref) -> str:
    got = [r["tokens"] for r in c.ok if "tokens" in r]
    if ref is None or not got:
        return "–"
    same = sum(t == ref for t in got)
    return "yes" if same == len(got) else f"{same}/{len(got)}"


def read_bandwidth(cs):
    """The faster cold read of the disk tier (1 or 4 threads), in GB/s, and which it was."""
    found = [(c.med("gbps"), name) for name in ("read-1", "read-4")
             if (c := cs.get(name)) is not None and c.ok]
    return max(found) if found else (None, None)


def floor_s(cs, disk_bytes):
    """max(reading ``disk_bytes`` at the faster cold read, the compute of a step in RAM)."""
    (bw, _), compute = read_bandwidth(cs), cs.get("compute")
    step = compute.med("decode_step_s") if compute and compute.ok else None
    read = disk_bytes / (bw * 1e9) if bw and disk_bytes is not None else None
    known = [x for x in (read, step) if x is not None]
    return (max(known) if known else None), read, step


# ---------------------------------------------------------------------------------------------
# tables


def table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def with_twins(names) -> list[str]:
    """Each row, then its ``@before`` twin (run with another bigload tree)."""
    return [n for name in names for n in (name, f"{name}@before")]


def call_of(calls, name: str) -> str:
    base, _, tree = name.partition("@")
    return calls.get(base, "") + (f" ({tree})" if tree else "")


def generate_table(cs, ref, calls) -> list[str]:
    header = ["row", "call", "ok/runs", "OOM kills", "load s", "prefill s", "decode step s",
              "step ÷ floor", "read/step", "read/step ÷ disk tier", "disk tier",
              "peak cgroup", "anon (max)", "written", "same tokens"]
    rows = []
    for name in (*with_twins(GENERATE_ROWS), "compute"):
        c = cs.get(name)
        if c is None:
            continue
        kills = str(c.total("oom_kills")) if name != "compute" else "–"
        peak = mib(c.med("cgroup_peak_bytes", failed_too=True))
        if not c.ok:
            rows.append([name, call_of(calls, name), c.count(), kills, ERR, *["–"] * 6, peak,
                         "–", "–", "–"])
            continue
        disk, step = c.med("disk_bytes"), c.med("decode_step_s")
        read = c.med("read_per_step_bytes")
        floor = floor_s(cs, disk)[0] if name != "compute" else None
        rows.append([
            name, call_of(calls, name), c.count(), kills, sec(c.med("load_s")),
            sec(c.med("forward_s")), sec(step), times(step / floor) if step and floor else "–",
            mib(read), times(read / disk) if read is not None and disk else "–", mib(disk),
            peak if name != "compute" else "–",
            mib(c.med("max_anon_bytes")) if name != "compute" else "–",
            mib(c.med("written_bytes")), same_tokens(c, ref),
        ])
    return table(header, rows)


def floors_table(cs) -> list[str]:
    rows = []
    for name in ("read-1", "read-4"):
        c = cs.get(name)
        if c is not None:
            rows.append([name, c.count(), sec(c.med("read_s")), mib(c.med("bytes")),
                         f"{c.med('gbps'):.2f} GB/s" if c.ok else ERR])
    c = cs.get("compute")
    if c is not None:
        rows.append(["compute (decode step, all in RAM)", c.count(), sec(c.med("decode_step_s")),
                     "–", "–"])
    return table(["floor", "ok/runs", "s", "bytes", "bandwidth"], rows)


def fits_table(cs) -> list[str]:
    rows = []
    for name in with_twins(("fits", "fits-warm")):
        c = cs.get(name)
        if c is None:
            continue
        rows.append([name, c.count(), str(c.total("oom_kills")), sec(c.med("load_s")),
                     sec(c.med("load_touch_s")), mib(c.med("cgroup_peak_bytes", failed_too=True)),
                     mib(c.med("written_bytes"))])
    return table(["row", "ok/runs", "OOM kills", "load s", "load+touch s", "peak cgroup",
                  "written"], rows)


# ---------------------------------------------------------------------------------------------
# targets


def verdict(value, limit) -> str:
    return "–" if value is None else ("met" if value <= limit else "missed")


def targets(cs, baseline_cs) -> list[str]:
    rows = []
    for name in TARGET_ROWS:
        c = cs.get(name)
        if c is None:
            continue
        disk, read, step = c.med("disk_bytes"), c.med("read_per_step_bytes"), c.med(
            "decode_step_s")
        floor, read_floor, compute = floor_s(cs, disk)
        ratio = read / disk if read is not None and disk else None
        if not c.ok:
            status = "missed"
        elif disk:
            status = verdict(ratio, 1.05)
        else:  # nothing planned on disk: any re-reading is a miss
            status = "met" if (read or 0) < 1 << 20 else "missed (nothing planned on disk)"
        rows.append([f"{name}: bytes read per decode step ≤ 1.05× the disk tier",
                     f"{mib(read)} per step, disk tier {mib(disk)} → {times(ratio)}"
                     if c.ok else ERR, status])
        sratio = step / floor if step and floor else None
        rows.append([f"{name}: decode step ≤ 1.2× max(cold read of the disk tier, compute "
                     "in RAM)",
                     f"{sec(step)} s; read {sec(read_floor)} s, compute {sec(compute)} s → "
                     f"{times(sratio)}" if c.ok else ERR, verdict(sratio, 1.2) if c.ok
                     else "missed"])
        kills = c.total("oom_kills")
        rows.append([f"{name}: no OOM kill in any repetition",
                     f"{kills} OOM kill(s) in {len(c.runs)} runs",
                     "met" if kills == 0 and c.ok else "missed"])
        written = max((r.get("written_bytes") or 0 for r in c.ok), default=None)
        rows.append([f"{name}: 0 bytes written (dtypes match)",
                     f"at most {mib(written)} written per run (under 1 MiB counts as 0)"
                     if c.ok else ERR,
                     verdict(written, 1 << 20) if written is not None else "missed"])
    for name in ("fits", "fits-warm"):
        c = cs.get(name)
        if c is None:
            continue
        now = c.med("load_touch_s")
        twin = cs.get(f"{name}@before")  # interleaved: the same machine load as ``now``
        then = twin if twin and twin.ok else (baseline_cs or {}).get(name)
        before = then.med("load_touch_s") if then else None
        where = "the @before rows" if then is twin else "the baseline run"
        ratio = now / before if now and before else None
        rows.append([f"{name}: load+touch of a model that fits ≤ 1.1× before",
                     f"{sec(now)} s, before {sec(before)} s ({where}) → {times(ratio)}" if before
                     else f"{sec(now)} s (this is the 'before' figure; pass --baseline)",
                     verdict(ratio, 1.1) if ratio else "–"])
    return table(["target", "figures", "status"], rows)


# ---------------------------------------------------------------------------------------------
# the section


def planned_budgets(cs) -> list[str]:
    """The CPU budget each bigload row planned with, and where bigload says it came from."""
    out = []
    for name in TARGET_ROWS:
        c = cs.get(name)
        run = next((r for r in (c.ok if c else []) if r.get("budget_sources")), None)
        if run is not None and "cpu" in run.get("budgets", {}):
            out.append(f"- `{name}` planned with a CPU budget of {mib(run['budgets']['cpu'])} "
                       f"({run['budget_sources'].get('cpu', '?')})")
    return out


def shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(C.REPO_ROOT)) if path.is_relative_to(C.REPO_ROOT) else str(path)


def capability(results) -> list[str]:
    found = {r["cpu_capability"] for r in results if r.get("cpu_capability")}
    return [f"- torch CPU kernels: {', '.join(sorted(found))} (bf16 matmuls without AVX-512 "
            "are slow: see the compute floor)"] if found else []


def render(results, meta, *, raw: Path, baseline=None) -> str:
    cs = cells(results)
    base = cells([r for r in baseline if "meta" not in r]) if baseline else None
    ref = reference_tokens(cs)
    idle = next((r for r in results if r.get("kind") == "idle"), {})
    probe = next((r for r in results if r.get("kind") == "probe"), {})
    big, fits, limit = meta["big"], meta["fits"], meta["limit"]
    idle_failed = f"; failed: {idle['error'][:100]}" if "error" in idle else ""
    s = big["shape"]
    out = [
        BEGIN, "", f"## Bigger than RAM: a {big['bytes'] / 1e9:.2f} GB checkpoint in a "
        f"{mib(limit)} memory cgroup", "",
        f"Generated {meta['started'][:16].replace('T', ' ')} UTC by `python "
        f"benchmarks/bigger_than_ram.py {' '.join(meta['argv'])}`: {meta['reps']} interleaved "
        f"repetition(s), medians shown, each measurement a fresh process in a fresh memory "
        f"cgroup (cgroup {meta['cgroup']}). Raw results: `{shown(raw)}`. "
        "How to read this: benchmarks/README.md (\"Bigger than RAM\").", "",
        f"- **bigload under test: {meta['bigload_rev']}** (`{meta['bigload_src']}`)",
        *([f"- **`@before` rows: bigload {meta['before_rev']}** (`{meta['before_src']}`), "
           "interleaved with the others"] if meta.get("before_src") else []),
        "- " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        *meta["machine"], *_report.contention(results), *capability(results),
        f"- Checkpoint: random-weight Llama, bf16, hidden {s['hidden_size']}, intermediate "
        f"{s['intermediate_size']}, {s['num_hidden_layers']} layers, vocab {s['vocab_size']} "
        f"({big['params'] / 1e9:.2f}B parameters), {big['files']} safetensors shards, "
        f"{big['bytes'] / 1e9:.2f} GB = {big['bytes'] / limit:.2f}× the limit",
        f"- A worker's imports (torch, transformers, accelerate, bigload) leave "
        f"{mib(meta['idle_bytes'])} charged to the cgroup (working set of an idle worker "
        f"after a cold start, median of 3{idle_failed}); "
        f"CPU budget B = {mib(meta['cpu_budget'])} ({meta['cpu_budget']:,} bytes: "
        f"{meta.get('budget_rule', '?')})",
        f"- Disk tier of the budgeted bigload plan (what the read floors read): "
        f"{mib(probe.get('ranges_bytes'))}" + (f" (probe failed: {probe['error'][:120]})"
                                               if "error" in probe else ""),
        *planned_budgets(cs),
        f"- Page cache dropped before every cold measurement by `{meta['cold']}`; prompt "
        f"{meta['prompt_len']} random ids, {meta['new_tokens']} greedy tokens",
        "", "### Decoding", "",
        *generate_table(cs, ref, meta.get("calls", {})), "",
        "`read/step`: median bytes this process read from storage (`read_bytes` of "
        "/proc/self/io) between consecutive tokens; `disk tier`: checkpoint bytes of the "
        "modules the row's `hf_device_map` puts on disk; `step ÷ floor`: decode step ÷ "
        "max(the row's disk tier at the faster cold read bandwidth of the floors, the compute "
        "row's step); `peak cgroup`: the cgroup's peak charge (page cache included); `anon "
        "(max)`: the most anonymous memory charged at a token (memory.stat), what the kernel "
        "cannot reclaim without swap; `written`: "
        "`write_bytes` of the process, load and decoding; `same tokens`: as the compute row.",
        "", "### Floors", "", *floors_table(cs), "",
        f"### A model that fits ({fits['bytes'] / 1e6:.0f} MB, "
        f"{fits['shape']['num_hidden_layers']} layers, hidden {fits['shape']['hidden_size']})",
        "", *fits_table(cs), "", "### Targets", "", *targets(cs, base), "",
    ]
    errors = [(name, e) for name, c in cs.items() for e in c.errors()]
    if errors:
        out += ["### Errors", ""] + [f"- `{n}`: {e[:300]}" for n, e in errors] + [""]
    return "\n".join(out + [END])


def write_section(path: Path, section: str) -> None:
    """Replace the marked section of ``path`` (or append it)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def keep_sections(old: str, new: str) -> str:
    """``new`` with the marked section of ``old`` appended (run.py rewrites the file)."""
    if BEGIN not in old or END not in old or BEGIN in new:
        return new
    section = BEGIN + old.split(BEGIN, 1)[1].split(END, 1)[0] + END
    return new.rstrip("\n") + "\n\n" + section + "\n"
