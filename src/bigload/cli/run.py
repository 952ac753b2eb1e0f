"""``bigload run``: load a model with bigload.load and run it — greedy generation (streamed),
sentence embeddings, cross-encoder scores, or mean-pooled hidden states — saying what happens:
the plan as soon as it exists, a progress bar when the load is long, where the time went
(imports, skeleton, plan, load, run) and what the resident memory holds."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import (
    HelpFormatter,
    absent_devices,
    add_json,
    add_model_class,
    add_path,
    add_planning,
    add_world,
    budgets_of,
    dtype_str,
    print_json,
    with_budget_words,
)
from .running import DEFAULT_PROMPT

EPILOG = """\
examples:
  bigload run                                      # the default model, all-MiniLM-L6-v2
  bigload run --max-memory cpu=70MB,disk=1GB       # the same, part of the model served from disk
  bigload run ./all-MiniLM-L6-v2 --text "a cat" --text "a kitten" --text "tax law"
  bigload run ./ms-marco-MiniLM-L6-v2 --text "how big is a cat" --text "Cats weigh 4 kg."
  bigload run ./llama/ --prompt "The capital of France is" --max-new-tokens 20
  bigload run ./llama/ --max-memory 0=20GiB,cpu=30GiB,disk=200GiB --dtype bfloat16 \\
      --offload-dir /scratch/llama-offload         # kept: reused by the next run
  bigload run ./llama/ --missing error             # refuse a checkpoint that lacks tensors
  bigload run ./llama/ --json | jq .result
  bigload run Qwen/Qwen2.5-0.5B                    # a model id: downloaded if not in the cache
  bigload run ./llama/ --nproc 2 --max-memory cpu=2GiB   # two ranks on this machine (torchrun)
  torchrun --nproc-per-node 2 -m bigload run ./llama/ --world auto --prompt "Hello"
  torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
      -m bigload run ./llama/ --world auto         # on each of two machines

What runs: a sentence-transformers folder (modules.json) → the library's own model: embeddings
and their similarities (encode), or for a CrossEncoder the scores of every pair of texts
(predict); a causal LM (config.architectures *ForCausalLM, or a seq2seq LM) → greedy generation,
the tokens printed as they come; any other model → mean-pooled last_hidden_state. Each --text
takes one text (repeat the flag). Budgets must name devices this machine has (bigload plan
--for-other-machine plans for others). The offload directory, needed only when disk tensors must
be converted (a dtype change, a torch .bin checkpoint), defaults to a temporary one removed at
exit. On a terminal, a load longer than a second shows a progress bar on stderr.

Across ranks (--world, --nproc) every rank loads only its stage and runs the same calls; rank 0
prints (the others run quietly), with each rank's tensors, bytes and peak memory.

The summary at the end: the time of each stage (imports are torch's, transformers' and the
model code's, paid once per process; load is bigload.load less skeleton and plan), and the
resident memory (RSS) before the load — Python, torch, transformers: no budget covers it — and
its peak since, with the weights of each tier. Disk-tier weights stay in their files: where
memory is tight each unit is read as it runs into streaming buffers (the plan's reserve), else
it runs on views of its file, mapped (in RSS) only while it runs.
"""


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "run", parents=parents, formatter_class=HelpFormatter, epilog=EPILOG,
        help="load a model with bigload.load and run it (generate, embed, score pairs)",
        description="Load a model with bigload.load over the budgets and run it: greedy "
                    "generation for causal LMs, embeddings and similarities for encoders, "
                    "pair scores for cross-encoders.",
    )
    add_path(parser, "model folder (config.json + weights, or a sentence-transformers folder) "
                     "or model id", downloads=True)
    add_planning(parser)
    add_world(parser, auto=True)
    parser.add_argument("--nproc", type=_positive, metavar="N",
                        help="run N ranks on this machine: launches torchrun with --world auto")
    parser.add_argument("--offload-dir", metavar="DIR",
                        help="where converted disk tensors are written (default: a temporary "
                             "directory removed at exit)")
    parser.add_argument("--missing", choices=("init", "error", "zeros"), default="init",
                        help="tensors the checkpoint lacks: the model's _init_weights (default), "
                             "refuse, or zeros")
    add_model_class(parser)
    parser.add_argument("--prompt", metavar="TEXT",
                        help=f"generation prompt (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=_positive, default=20, metavar="N",
                        help="tokens to generate (default: 20)")
    parser.add_argument("--text", action="append", metavar="TEXT",
                        help="one text to embed or score; repeat the flag for more (default: "
                             "three example sentences)")
    add_json(parser)
    parser.set_defaults(func=execute, parser=parser)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def execute(args: argparse.Namespace) -> int:
    from bigload.errors import DeviceError

    from . import stages
    from .common import model_folder
    from .running import KIND_NAMES, check_tokenizer, model_kind

    if args.nproc is not None:
        from .ranks import launch

        return launch(args)
    clock = stages.Clock()
    with clock.stage("imports"):
        stages.import_libraries()
    absent = absent_devices(args.max_memory)
    if absent:
        raise DeviceError("; ".join(absent) + ". bigload run loads on this machine: budget "
                          "the devices it has (e.g. --max-memory cpu=8GiB,disk=100GiB); bigload "
                          "plan --for-other-machine plans for another machine.")
    with clock.stage("fetch") if _is_model_id(args.path) else contextlib.nullcontext():
        folder = model_folder(args.path, download=True, hint=(
            "to embed several texts give each its own flag: --text 'a cat' --text 'a dog'"))
    kind = model_kind(folder, args.model_class)
    _check_inputs(args, kind)
    if args.world is not None and kind in ("sentence", "cross"):
        args.parser.error("a sentence-transformers folder runs in one process; across ranks "
                          "run its transformer folder (the path its modules.json names)")
    if kind in ("generate", "encode"):
        check_tokenizer(folder)
    with clock.stage("imports"):
        stages.import_model_code(folder, sentence=kind in ("sentence", "cross"))
    if not args.json:
        _say(f"model: '{folder}' ({KIND_NAMES[kind]})")
    return _load_and_run(args, folder, kind, clock)


def _load_and_run(args: argparse.Namespace, folder: Path, kind: Any, clock: Any) -> int:
    from .ranks import quiet_unless_rank_0

    with quiet_unless_rank_0(args.world):
        return _load_and_run_here(args, folder, kind, clock)


def _load_and_run_here(args: argparse.Namespace, folder: Path, kind: Any, clock: Any) -> int:
    from bigload import hf

    from . import stages
    from .progress import bar_for
    from .running import load_tokenizer, run_model

    memory = {"rss_before_load_bytes": stages.rss_bytes(),
              "peak_since_load": stages.reset_peak_rss()}
    stages.reset_accelerator_peaks()
    show = None if args.json else (lambda model, plan: _show_plan(model, plan, args))
    with _offload_dir(args.offload_dir) as offload_dir:
        with stages.timed_load(clock, show):
            with clock.stage("tokenizer"):
                tokenizer = load_tokenizer(folder) if kind in ("generate", "encode") else None
            model = hf.load(folder, device_map=args.strategy,
                            max_memory=budgets_of(args, args.world), dtype=args.dtype,
                            offload_dir=offload_dir, missing=args.missing,
                            model_class=args.model_class, no_split_module_classes=args.no_split,
                            prefetch=args.prefetch, progress=bar_for(sys.stderr),
                            world=args.world)
        if not args.json:
            _say(*report_lines(model), "")
        with clock.stage("run"):
            result = run_model(model, kind, tokenizer, texts=args.text, prompt=args.prompt,
                               max_new_tokens=args.max_new_tokens, stream=not args.json)
    memory.update(peak_rss_bytes=stages.peak_rss_bytes(),
                  accelerator_peak_bytes=stages.accelerator_peaks())
    out = summary(model, folder, kind, args, clock, memory, result)
    if model.bigload_plan.world_size > 1:
        from .ranks import rank_summaries

        out["ranks"] = rank_summaries(out)
    if args.json:
        print_json(out)
    else:
        _say(*render(out, streamed=kind == "generate"))
    return 0


def _is_model_id(path: str | None) -> bool:
    return path is not None and not Path(path).expanduser().exists()


def _check_inputs(args: argparse.Namespace, kind: str) -> None:
    if kind == "generate" and args.text:
        args.parser.error("--text is for encoders; this model generates: use --prompt")
    if kind != "generate" and args.prompt is not None:
        args.parser.error("--prompt is for causal LMs; this model embeds texts: use --text")


def _say(*lines: str) -> None:
    print("\n".join(lines), flush=True)


def _show_plan(model: Any, plan: Any, args: argparse.Namespace) -> None:
    """Printed as soon as the plan exists, before a tensor is read."""
    _say(f"{type(model).__name__} at {dtype_str(getattr(model, 'dtype', '?'))}, planned:",
         *plan_lines(plan, args), "")


def plan_lines(plan: Any, args: argparse.Namespace) -> list[str]:
    from bigload.plan.render import render

    return list(render(with_budget_words(plan, args.max_memory), details=False))


@contextlib.contextmanager
def _offload_dir(given: str | None) -> Iterator[str]:
    if given is not None:
        yield given
        return
    # Converted disk tensors are memory-mapped from here until the model is gone: keep the
    # directory for the whole run. Written only if a conversion is needed.
    with tempfile.TemporaryDirectory(prefix="bigload-run-", ignore_cleanup_errors=True) as tmp:
        yield str(Path(tmp) / "offload")


# --- the summary -------------------------------------------------------------------------------
def summary(model: Any, folder: Path, kind: str, args: argparse.Namespace, clock: Any,
            memory: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Everything ``--json`` prints; the text output renders the same."""
    report = model.bigload_report
    seconds = clock.ordered()
    seconds["within_load"] = {"conversions": clock.seconds.get("conversions", 0.0),
                              "tokenizer": clock.seconds.get("tokenizer", 0.0),
                              "tensors_placed": report.seconds}
    from bigload.plan import tier_key

    memory["weights_bytes"] = dict(sorted(report.bytes_per_device.items(),
                                          key=lambda item: tier_key(item[0])))
    memory["disk_tier"] = _disk_tier_mode(model)
    return {"model": str(folder), "kind": kind, "model_class": type(model).__name__,
            "transformers_class": report.model_class,
            "plan": plan_summary(with_budget_words(model.bigload_plan, args.max_memory)),
            "seconds": seconds, "memory": memory, "load_report": report_summary(report),
            "result": result}


def _disk_tier_mode(model: Any) -> str:
    """How disk units run: ``"streamed"`` through the pool (memory is tight), else on
    ``"views"`` of their files."""
    from bigload.runtime import state_of

    states = (state_of(m) for m in model.modules()) if hasattr(model, "modules") else ()
    state = next((s for s in states if s is not None), None)
    return "streamed" if state is not None and state.streamer is not None else "views"


def plan_summary(plan: Any) -> dict[str, Any]:
    """Per device: units, bytes, budget (and where it came from) and the runs of units it holds,
    each as fields; units without bytes of their own are listed apart."""
    from bigload.plan import runs

    if plan.world_size > 1:
        plan = plan.for_rank(plan.rank)
        sized = [u for u in plan.local_units if u.size_bytes]
    else:
        sized = [u for u in plan.units if u.size_bytes]
    devices: dict[str, dict[str, Any]] = {
        p: {"units": 0, "bytes": 0, "budget_bytes": plan.budgets.get(p),
            "budget_source": plan.budget_sources.get(p), "ranges": []}
        for p in plan.bytes_per_device if any(u.placement == p for u in sized)}
    for run in runs(sized):
        where = devices[run[0].placement]
        size = sum(u.size_bytes for u in run)
        where["units"] += len(run)
        where["bytes"] += size
        where["ranges"].append({"first": run[0].name, "last": run[-1].name, "units": len(run),
                                "bytes": size})
    return {"main_device": plan.main_device, "strategy": plan.strategy,
            "world_size": plan.world_size, "rank": plan.rank,
            "reserve_bytes": plan.reserve_bytes, "prefetch": plan.prefetch,
            "units": len(plan.units), "devices": devices,
            "units_without_bytes": [u.name for u in plan.units if not u.size_bytes]}


def report_summary(report: Any) -> dict[str, Any]:
    return {"checkpoint": report.checkpoint, "loaded": len(report.loaded),
            "zero_copy": report.zero_copy, "initialized": dict(report.initialized),
            "kept": len(report.kept), "unexpected": list(report.unexpected),
            "tied_groups": len(report.tied), "cast": len(report.cast),
            "bytes_per_device": dict(report.bytes_per_device),
            "bytes_written": report.bytes_written, "offload_folder": report.offload_folder,
            "seconds": report.seconds}


def report_lines(model: Any) -> list[str]:
    from bigload.devices import format_size

    report = model.bigload_report
    inside = f" ({report.model_class} inside)" if report.model_class != type(model).__name__ \
        else ""
    lines = [f"loaded {type(model).__name__}{inside}: {len(report.loaded)} tensors "
             f"({report.zero_copy} zero-copy), {len(report.initialized)} initialised, "
             f"{len(report.unexpected)} unexpected, {_count(len(report.tied), 'tied group')}, "
             f"{len(report.cast)} cast, {format_size(report.bytes_written)} written to an "
             "offload folder"]
    if report.initialized:
        names = list(report.initialized)
        lines.append(f"  initialised (not in the checkpoint): {', '.join(names[:5])}"
                     + (f" … and {len(names) - 5} more" if len(names) > 5 else ""))
    return lines


def render(out: dict[str, Any], *, streamed: bool) -> list[str]:
    """The result, then where the time and the memory went."""
    from .running import render_result

    return [*render_result(out["result"], streamed=streamed), "",
            time_line(out["seconds"], out["kind"]), *memory_lines(out), *_rank_lines(out)]


def _rank_lines(out: dict[str, Any]) -> list[str]:
    from .ranks import rank_lines

    return rank_lines(out)


_HF_IMPORTS = "torch, transformers, the model's code"
_ST_IMPORTS = "torch, transformers, sentence-transformers, the model's code"
_IMPORTED = {"sentence": _ST_IMPORTS, "cross": _ST_IMPORTS}


def time_line(seconds: dict[str, Any], kind: str) -> str:
    """``time: imports 3.9 s (...) · skeleton 0.02 s · plan 0.01 s · load 0.5 s (...) · run``."""
    parts = []
    for stage, value in seconds.items():
        if stage == "within_load":
            continue
        text = f"{stage} {value:.2f} s"
        if stage == "imports":
            text += f" ({_IMPORTED.get(kind, _HF_IMPORTS)})"
        if stage == "load":
            text += f" ({_within_load(seconds['within_load'])})"
        parts.append(text)
    return "time: " + " · ".join(parts)


_WITHIN_LOAD = {"conversions": "transformers' checkpoint conversions", "tokenizer": "tokenizer"}


def _within_load(within: dict[str, float]) -> str:
    parts = [f"{_WITHIN_LOAD[name]} {within[name]:.2f} s" for name in _WITHIN_LOAD
             if within.get(name, 0.0) >= 0.05]
    return ", ".join([*parts, f"tensors placed in {within['tensors_placed']:.2f} s"])


def memory_lines(out: dict[str, Any]) -> list[str]:
    from bigload.devices import format_size

    memory = out["memory"]
    before, peak = memory["rss_before_load_bytes"], memory["peak_rss_bytes"]
    since = ("since the load started" if memory["peak_since_load"] else
             "of the whole process")
    lines = [f"memory (RSS): {format_size(before)} before the load (Python, torch, "
             f"transformers: no budget covers it); peak {format_size(peak)} {since} "
             f"({_signed(peak - before)})"]
    lines += [f"  {line}" for line in _weights(out, format_size)]
    weights = out["memory"]["weights_bytes"]
    streamed = out["plan"]["reserve_bytes"] if "disk" in weights else 0
    rest = peak - before - weights.get("cpu", 0) - streamed
    if memory["peak_since_load"] and rest > 0:
        lines.append(f"  the rest of the rise, about {format_size(rest)}: activations, the "
                     "tokenizer and what else the load and the run allocate")
    return lines


def _weights(out: dict[str, Any], format_size: Any) -> list[str]:
    devices = out["plan"]["devices"]
    written = out["load_report"]["bytes_written"]
    peaks = out["memory"]["accelerator_peak_bytes"]
    reserve = out["plan"]["reserve_bytes"]
    lines = []
    for device, size in out["memory"]["weights_bytes"].items():
        budget = (devices.get(device) or {}).get("budget_bytes")
        of = f" (budget {format_size(budget)})" if budget is not None else ""
        if device == "cpu":
            lines.append(f"cpu-tier weights {format_size(size)}, read into RAM{of}")
        elif device == "disk":
            source = "the checkpoint" + (" and the offload folder" if written else "")
            if out["memory"].get("disk_tier") == "views":
                how = ("each unit runs on views of its file, mapped (in RSS) only while it "
                       "runs; its pages are left to the page cache, which this machine has "
                       "room for")
            else:
                how = (f"each unit is read as it runs into streaming buffers (the plan's "
                       f"{format_size(reserve)} reserve, in RSS), the page cache dropped behind")
            lines.append(f"disk-tier weights {format_size(size)}, left in {source}: {how}")
        else:
            peak = f"; peak allocated {format_size(peaks[device])}" if device in peaks else ""
            lines.append(f"{device} weights {format_size(size)}{of}, not in RSS{peak}")
    return lines


def _signed(size: int) -> str:
    from bigload.devices import format_size

    return ("+" if size >= 0 else "-") + format_size(abs(size))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
