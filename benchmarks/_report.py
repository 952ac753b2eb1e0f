"""Turn worker results into benchmarks/RESULTS.md: machine, versions, median tables, targets."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

from benchmarks import _common as C

ERR = "n/a (error)"


# ---------------------------------------------------------------------------------------------
# formatting


def gb(n) -> str:
    return "–" if n is None else f"{n / 1e9:.2f} GB"


def sec(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def one_line(r: dict) -> str:
    if "error" in r:
        return "error: " + r["error"][:200]
    keys = (
        "load_s",
        "load_touch_s",
        "forward_s",
        "decode_step_s",
        "tokens_per_s",
        "peak_rss_bytes",
        "bytes_written",
        "offload_dir_bytes",
        "resident_after_evict",
    )
    return " ".join(
        f"{k}={r[k]:.4g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}"
        for k in keys
        if r.get(k) is not None
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ---------------------------------------------------------------------------------------------
# aggregation


class Cell:
    """All repetitions of one (scenario, mode, tool)."""

    def __init__(self, runs: list[dict]):
        self.runs = runs
        self.ok = [r for r in runs if "error" not in r]
        self.errors = [r["error"] for r in runs if "error" in r]

    def med(self, key):
        vals = [r[key] for r in self.ok if isinstance(r.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    def count(self) -> str:
        return f"{len(self.ok)}/{len(self.runs)}"


def cells(results: list[dict]) -> dict[tuple[str, str, str], Cell]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["scenario"], r["mode"], r["tool"]), []).append(r)
    return {k: Cell(v) for k, v in groups.items()}


def cell_or_none(cs, scenario, mode, tool) -> Cell | None:
    c = cs.get((scenario, mode, tool))
    return c if c is not None and c.ok else None


def med(cs, scenario, mode, tool, key):
    c = cell_or_none(cs, scenario, mode, tool)
    return None if c is None else c.med(key)


# ---------------------------------------------------------------------------------------------
# machine and versions


def _run(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> list[str]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        "?",
    )
    mem = next(
        int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.startswith("MemTotal")
    )
    hyper = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in _run(["lscpu"]).splitlines()
            if ln.startswith("Hypervisor vendor")
        ),
        "none reported",
    )
    df = _run(["df", "-hT", str(C.WORK_DIR)]).splitlines()[-1:]
    disk = " ".join(df[0].split()[:3]) if df else "?"
    dev = os.path.basename(df[0].split()[0]) if df else ""
    rot = _run(["cat", f"/sys/block/{dev}/queue/rotational"]) if dev else ""
    kind = {"0": "non-rotational", "1": "reports rotational (virtual disks often do)"}.get(rot, "?")
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores visible (hypervisor: {hyper})",
        f"- RAM: {mem / 2**30:.1f} GiB",
        f"- Disk holding the checkpoints: {disk} ({kind})",
        f"- OS: {platform.platform()}",
    ]


def contention(results) -> list[str]:
    loads = [x for r in results for x in r.get("loadavg_1m") or []]
    if not loads:
        return []
    return [
        f"- 1-minute load average at the start/end of the measurements: median "
        f"{statistics.median(loads):.2f}, max {max(loads):.2f} on {os.cpu_count()} cores (above "
        "the core count, other processes competed for the CPU and the timings are noisier)"
    ]


def versions() -> list[str]:
    out = [f"- python {platform.python_version()}"]
    for pkg in ("torch", "transformers", "accelerate", "safetensors", "bigload"):
        try:
            out.append(f"- {pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(f"- {pkg}: not installed")
    rev = _run(["git", "-C", str(C.REPO_ROOT), "rev-parse", "--short", "HEAD"]) or "no commit yet"
    dirty = _run(["git", "-C", str(C.REPO_ROOT), "status", "--porcelain", "src"])
    out.append(f"- bigload git rev: {rev}{' (+ uncommitted changes in src/)' if dirty else ''}")
    return out


# ---------------------------------------------------------------------------------------------
# scenario tables


def err_cell(c: Cell | None) -> str:
    if c is None:
        return "not run"
    return ERR if not c.ok else ""


def rows_for(cs, scenario, mode, columns, skip=()) -> str:
    """One row per tool of (scenario, mode); ``columns`` is [(header, cell -> text)]."""
    rows = []
    for (s, m, tool), c in cs.items():
        if (s, m) != (scenario, mode) or tool in skip:
            continue
        if not c.ok:
            rows.append([tool, c.count(), ERR] + ["–"] * (len(columns) - 1))
        else:
            rows.append([tool, c.count()] + [f(c) for _, f in columns])
    return table(["tool", "ok/runs"] + [h for h, _ in columns], rows)


def gpu_column(scenario):
    return [("GPU peak", lambda c: gb(c.med("gpu_peak_bytes")))] if "cuda" in scenario else []


def load_table(cs, scenario, mode, key) -> str:
    floor = med(cs, scenario, mode, "raw", key) or med(cs, "load_cpu", mode, "raw", key)
    hf = med(cs, scenario, mode, "transformers", key)
    columns = [
        ("load s", lambda c: sec(c.med("load_s"))),
        ("load+touch s", lambda c: sec(c.med("load_touch_s"))),
        ("× raw read", lambda c: ratio(c.med(key), floor)),
        ("× transformers", lambda c: ratio(c.med(key), hf)),
        ("peak RSS", lambda c: gb(c.med("peak_rss_bytes"))),
        ("peak RSS − RSS before load", lambda c: gb(c.med("peak_rss_over_base_bytes"))),
        *gpu_column(scenario),
        ("bytes written", lambda c: gb(c.med("bytes_written"))),
        ("offload dir", lambda c: gb(c.med("offload_dir_bytes"))),
    ]
    return rows_for(cs, scenario, mode, columns)


BASELINES = {"generate": ("bigload-ram", "transformers-ram"),
             "generate_cuda": ("bigload-gpu", "transformers-gpu")}  # fmt: skip


def same_tokens(c: Cell, reference) -> str:
    if reference is None:
        return "–"
    return "yes" if all(r.get("tokens") == reference for r in c.ok) else "NO"


def percent(x) -> str:
    return "–" if x is None else f"{x:.0%}"


def disk_columns(scenario):
    if scenario != "generate":
        return []
    return [
        ("disk-tier bytes", lambda c: gb(c.med("disk_bytes"))),
        ("resident after eviction", lambda c: percent(c.med("resident_after_evict"))),
    ]


def generate_table(cs, scenario, mode, reference) -> str:
    base = next((v for t in BASELINES[scenario]
                 if (v := med(cs, scenario, "warm", t, "decode_step_s"))), None)  # fmt: skip
    hf_tps = med(cs, scenario, mode, "transformers", "tokens_per_s")
    columns = [
        ("load s", lambda c: sec(c.med("load_s"))),
        ("forward s", lambda c: sec(c.med("forward_s"))),
        ("decode step s", lambda c: sec(c.med("decode_step_s"))),
        ("tokens/s", lambda c: sec(c.med("tokens_per_s"))),
        ("step × all-resident", lambda c: ratio(c.med("decode_step_s"), base)),
        ("tokens/s × transformers", lambda c: ratio(c.med("tokens_per_s"), hf_tps)),
        ("peak RSS − before load", lambda c: gb(c.med("peak_rss_over_base_bytes"))),
        *gpu_column(scenario),
        *disk_columns(scenario),
        ("same tokens", lambda c: same_tokens(c, reference)),
    ]
    text = rows_for(cs, scenario, mode, columns, skip=FLOORS)
    cells_ = [(t, c) for t in FLOORS if (c := cell_or_none(cs, scenario, mode, t))]
    floors = [f"`{t}` {sec(c.med('load_touch_s'))} s ({bandwidth_text(read_bandwidth(c))}, "
              f"{c.count()} ok)" for t, c in cells_]  # fmt: skip
    if not floors:
        return text
    return text + "\n\nCold read floors, whole checkpoint: " + ", ".join(floors) + "."


def h2d_table(cs) -> str:
    columns = [
        ("bytes", lambda c: gb(c.med("bytes_copied"))),
        ("pinned s", lambda c: sec(c.med("pinned_s"))),
        ("pinned GB/s", lambda c: sec(c.med("pinned_gbps"))),
        ("pageable s", lambda c: sec(c.med("pageable_s"))),
        ("pageable GB/s", lambda c: sec(c.med("pageable_gbps"))),
    ]
    return rows_for(cs, "h2d", "warm", columns)


FLOORS = ("raw", "safetensors")


def read_bandwidth(c: Cell):
    """Bytes per second of a floor run: raw read, or safetensors load_file plus touching."""
    t, n = c.med("load_touch_s"), c.med("bytes_read") or c.med("touch_bytes")
    return n / t if t and n else None


def bandwidth_text(bw) -> str:
    return "–" if not bw else f"{bw / 1e9:.2f} GB/s"


def best_cold_bandwidth(cs):
    """The fastest cold whole-checkpoint read of the run (raw read or safetensors), and which."""
    runs = [(f"{t}, {s}", cell_or_none(cs, s, m, t)) for t in FLOORS
            for s, m in (("generate", "evicted"), ("load_cpu", "cold"))]  # fmt: skip
    found = [(bw, name) for name, c in runs if c and (bw := read_bandwidth(c))]
    return max(found) if found else (None, "–")


def reference_tokens(cs, scenario):
    """Tokens of the all-resident run (transformers first): what every other tool should give."""
    for tool in (*reversed(BASELINES[scenario]), "transformers", "accelerate"):
        c = cell_or_none(cs, scenario, "warm", tool)
        if c is not None and c.ok[0].get("tokens"):
            return c.ok[0]["tokens"]
    return None


# ---------------------------------------------------------------------------------------------
# targets


def verdict(value, limit, *, at_most=True) -> str:
    if value is None or limit is None:
        return "n/a"
    return "met" if (value <= limit if at_most else value >= limit) else "missed"


WRITE_NOISE_BYTES = 1 << 20  # writes this small are other libraries' bookkeeping, not weights


def times(x) -> str:
    return "–" if x is None else f"{x:.1f}×"


def targets(cs, model_bytes) -> list[list[str]]:
    def m(scenario, tool, key, mode="warm"):
        return med(cs, scenario, mode, tool, key)

    bl, raw = m("load_cpu", "bigload", "load_touch_s"), m("load_cpu", "raw", "load_touch_s")
    hf = m("load_cpu", "transformers", "load_touch_s")
    rss = m("load_cpu", "bigload", "peak_rss_over_base_bytes")
    wr, od = (
        m("load_disk", "bigload", "bytes_written"),
        m("load_disk", "bigload", "offload_dir_bytes"),
    )
    clean = None if wr is None else (od or 0) == 0 and wr < WRITE_NOISE_BYTES
    bl_d, hf_d = m("load_disk", "bigload", "load_s"), m("load_disk", "transformers", "load_s")
    acc_d = m("load_disk", "accelerate", "load_s")
    speedup = acc_d / bl_d if acc_d and bl_d else None
    rows = [
        ["load to CPU, warm (load+touch) ≤ 1.3× raw read",
         f"bigload {sec(bl)} s, raw {sec(raw)} s → {ratio(bl, raw)}",
         verdict(bl, raw and 1.3 * raw)],
        ["load to CPU, warm (load+touch) ≤ 0.6× transformers",
         f"bigload {sec(bl)} s, transformers {sec(hf)} s → {ratio(bl, hf)}",
         verdict(bl, hf and 0.6 * hf)],
        ["load to CPU, warm: peak RSS growth ≤ model bytes + 10%",
         f"bigload {gb(rss)}, model {gb(model_bytes)} → {ratio(rss, model_bytes)}",
         verdict(rss, 1.1 * model_bytes)],
        ["half on disk, warm: 0 bytes written (dtypes match)",
         f"bigload write_bytes {'–' if wr is None else f'{wr:,.0f}'}, offload dir {gb(od)} "
         f"(write_bytes under {WRITE_NOISE_BYTES >> 20} MiB counts as 0)",
         "n/a" if clean is None else ("met" if clean else "missed")],
        ["half on disk, warm: load no slower than transformers",
         f"bigload {sec(bl_d)} s, transformers {sec(hf_d)} s → {ratio(bl_d, hf_d)}",
         verdict(bl_d, hf_d)],
        ["half on disk, warm: load ≥ 20× faster than accelerate",
         f"accelerate {sec(acc_d)} s / bigload {sec(bl_d)} s = {times(speedup)}",
         verdict(speedup, 20, at_most=False)],
    ]  # fmt: skip
    return rows + generation_targets(cs)


def disk_tier_bytes(cs):
    """Bytes on the disk tier: bigload's own map, else a peer's (same budget)."""
    for tool in ("bigload", "transformers", "accelerate"):
        for mode in ("evicted", "warm"):
            if v := med(cs, "generate", mode, tool, "disk_bytes"):
                return v, ("bigload's map" if tool == "bigload" else f"{tool}'s map")
    return None, "–"


def generation_targets(cs) -> list[list[str]]:
    ram = med(cs, "generate", "warm", "bigload-ram", "decode_step_s")
    warm = med(cs, "generate", "warm", "bigload", "decode_step_s")
    ev = med(cs, "generate", "evicted", "bigload", "decode_step_s")
    bw, bw_src = best_cold_bandwidth(cs)
    disk, disk_src = disk_tier_bytes(cs)
    read = disk / bw if disk and bw else None
    bound = max(ram, read) if ram and read else None
    bw_text = f"{bandwidth_text(bw)} ({bw_src})"
    return [
        ["offloaded generation, warm: decode step ≤ 1.05× all in RAM",
         f"bigload half on disk {sec(warm)} s, all in RAM {sec(ram)} s → {ratio(warm, ram)}",
         verdict(warm, ram and 1.05 * ram)],
        ["offloaded generation, evicted: decode step ≤ 1.10× max(compute, read)",
         f"bigload {sec(ev)} s; compute (all in RAM) {sec(ram)} s, read {sec(read)} s = {gb(disk)} "
         f"disk tier ({disk_src}) at {bw_text}, cold → {ratio(ev, bound)}",
         verdict(ev, bound and 1.10 * bound)],
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the document


def header(results, meta) -> list[str]:
    shape = C.SIZES[meta["size"]]
    started = dt.datetime.fromisoformat(meta["started"])
    cmd = "python benchmarks/run.py " + " ".join(meta["argv"])
    shards = len(C.checkpoint_files(Path(meta["folder"])))
    cold = ("available (posix_fadvise DONTNEED per file, checked with mincore)" if meta["cold_ok"]
            else "not measured on this run")  # fmt: skip
    return [
        "# bigload benchmarks", "",
        f"Generated {started:%Y-%m-%d %H:%M} UTC by `{cmd}`: {meta['reps']} interleaved "
        "repetition(s), each measurement a fresh process, medians shown. Raw per-run results: "
        "`benchmarks/_work/results/*.jsonl`. How to read this: benchmarks/README.md.", "",
        "## Machine", "", *(meta.get("machine") or machine_info()), *contention(results), "",
        "## Versions", "", *(meta.get("versions") or versions()), "",
        "## Checkpoint", "",
        f"Synthetic Llama ({shape.param_count() / 1e9:.3f}B parameters: hidden "
        f"{shape.hidden_size}, intermediate {shape.intermediate_size}, "
        f"{shape.num_hidden_layers} layers, vocab {shape.vocab_size}, untied), random weights, "
        f"bf16, `save_pretrained(max_shard_size='500MB')`: {shards} safetensors shards, "
        f"{gb(meta['model_bytes'])}. Offloaded runs allow "
        f"half the checkpoint bytes ({meta['model_bytes'] // 2:,}) on the fast tier "
        "(`max_memory`).", "",
        f"Cold page cache: {cold}.", "",
    ]  # fmt: skip


def render(results, *, plan, meta) -> str:
    cs = cells(results)
    out = header(results, meta) + scenario_sections(cs, SimpleNamespace(**meta))
    out += plan_section(plan)
    if any(s in ("load_cpu", "load_disk", "generate") for s, _, _ in cs):
        rows = targets(cs, meta["model_bytes"])
        out += ["## Targets", "", table(["target", "figures", "status"], rows), ""]
    return "\n".join(out + error_section(cs)) + "\n"


def modes_of(cs, scenario) -> list[str]:
    return list(dict.fromkeys(m for s, m, _ in cs if s == scenario))


LOAD_NOTE = (
    "`load s`: the load call; `load+touch s`: plus reading one element per page of every "
    "tensor (so lazily mapped weights count). Ratios use load+touch."
)
DISK_NOTE = (
    "Ratios use the load call alone (touching would read the disk tier). `bytes written`: "
    "the process's write_bytes (/proc/self/io) during the load; `offload dir`: its size "
    "afterwards."
)
EVICT_NOTE = (
    "Before the forward and after every token, the disk tier (the byte ranges of the tensors "
    "the model's map puts on disk, and the offload folder) is dropped from the page cache; "
    "the rest stays: madvise(MADV_PAGEOUT) on the process's own mappings, then on a fresh "
    "mapping of the still-resident pages, then posix_fadvise(DONTNEED). The time this takes "
    "is excluded."
)
MODE_TITLE = {"warm": "warm page cache", "cold": "cold page cache",
              "evicted": "disk tier evicted between tokens"}  # fmt: skip


def generate_note(args, baseline: str) -> str:
    return (f"Prompt of {args.prompt_len} random token ids, one timed forward of it, then greedy "
            f"generation of {args.new_tokens} tokens. `decode step`: median time between tokens; "
            f"`tokens/s` includes the prefill. `{baseline}` rows hold the whole model there (the "
            "compute baseline); `same tokens`: identical to the all-resident transformers "
            "output.")  # fmt: skip


SECTIONS = [  # scenario, title, note, table
    ("load_cpu", "1. Load to CPU", lambda a: LOAD_NOTE,
     lambda cs, mode: load_table(cs, "load_cpu", mode, "load_touch_s")),
    ("load_disk", "2. Load with half the model on disk", lambda a: DISK_NOTE,
     lambda cs, mode: load_table(cs, "load_disk", mode, "load_s")),
    ("generate", "3. Offloaded inference (half the bytes on disk)",
     lambda a: generate_note(a, "-ram"),
     lambda cs, mode: generate_table(cs, "generate", mode, reference_tokens(cs, "generate"))),
    ("h2d", "GPU: host-to-device copy floor", lambda a: "A checkpoint-sized buffer, median of 5.",
     lambda cs, mode: h2d_table(cs)),
    ("load_cuda", "GPU: load to cuda:0", lambda a: LOAD_NOTE,
     lambda cs, mode: load_table(cs, "load_cuda", mode, "load_touch_s")),
    ("generate_cuda", "GPU: offloaded inference (half the bytes on cuda:0, the rest in CPU RAM)",
     lambda a: generate_note(a, "-gpu"),
     lambda cs, mode: generate_table(cs, "generate_cuda", mode,
                                     reference_tokens(cs, "generate_cuda"))),
]  # fmt: skip


def scenario_sections(cs, args) -> list[str]:
    out = []
    for scenario, title, note, render_table in SECTIONS:
        modes = modes_of(cs, scenario)
        if not modes:
            continue
        out += [f"## {title}", "", note(args), ""]
        for mode in modes:
            extra = [EVICT_NOTE, ""] if mode == "evicted" else []
            out += [f"### {MODE_TITLE[mode]}", "", *extra, render_table(cs, mode), ""]
    return out


def plan_section(plan) -> list[str]:
    if plan is None:
        return []
    out = ["## 4. Planning a 100-billion-parameter meta model", ""]
    if "error" in plan:
        return out + [f"n/a ({plan['error']})", ""]
    body = plan["stdout"].strip() or plan["stderr"].strip()
    cmd = f"`python benchmarks/bench_plan.py` (exit {plan['returncode']}):"
    return out + [cmd, "", "```", body, "```", ""]


def error_section(cs) -> list[str]:
    rows = [[f"{s} / {m} / {t}", c.errors[0][:300].replace("|", "\\|").replace("\n", " ")]
            for (s, m, t), c in cs.items() if c.errors]  # fmt: skip
    return ["## Errors", "", table(["run", "first error"], rows), ""] if rows else []
