"""``bigload inspect``: what a checkpoint holds (format, files, tensors, dtypes, bytes, metadata),
read from file headers only; no model, no config, no tensor data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import HelpFormatter, add_json, add_path, dtype_str, print_json

EPILOG = """\
examples:
  bigload inspect                                       # the default model's checkpoint
  bigload inspect ./llama/                              # a folder: shards + index, or one file
  bigload inspect ./llama/model.safetensors.index.json  # a shard index
  bigload inspect ./ckpt/pytorch_model.bin              # a torch pickle (headers, no tensors)
  bigload inspect ./llama/ --tensors                    # every tensor: name, dtype, shape, file
  bigload inspect ./llama/ --json | jq .dtypes
  bigload inspect meta-llama/Llama-3.1-8B               # a model id in the local HF cache

A sentence-transformers folder (modules.json) shows the checkpoint of its transformers model.
"""


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "inspect", parents=parents, formatter_class=HelpFormatter, epilog=EPILOG,
        help="what a checkpoint holds, without loading it",
        description="Show what a checkpoint holds — format, files, tensor count, dtypes, bytes, "
                    "metadata — from the file headers only.",
    )
    add_path(parser, "checkpoint folder, weight file (.safetensors, .bin, .pt), *.index.json, "
                     "or model id")
    parser.add_argument("--tensors", action="store_true",
                        help="also list every tensor (name, dtype, shape, file)")
    add_json(parser)
    parser.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> int:
    from bigload.checkpoint import read_index

    summary = summarize(read_index(checkpoint_path(args.path)), tensors=args.tensors)
    if args.json:
        print_json(summary)
    else:
        print("\n".join(render(summary)))
    return 0


def checkpoint_path(path: str | None) -> Path:
    """What to read: a file, or a folder without modules.json, as given (a local path that is
    not there too: read_index names it); else the model folder of the default model or of a
    model id (local cache only), and of a sentence-transformers folder its transformers model's
    folder."""
    from bigload import hf

    from .common import model_folder

    if path is not None:
        given = Path(path).expanduser()
        if given.is_file() or given.is_dir() and not (given / "modules.json").is_file():
            return given
        if not given.exists() and (given.is_absolute() or path.startswith(".")):
            return given
    return hf.transformer_folder(model_folder(path))


def summarize(index: Any, *, tensors: bool = False) -> dict[str, Any]:
    """The JSON-able summary of a CheckpointIndex."""
    per_file: dict[str, int] = {}
    dtypes: dict[str, dict[str, int]] = {}
    for entry in index.entries.values():
        name = _relative(entry.file, index.root)
        per_file[name] = per_file.get(name, 0) + 1
        count = dtypes.setdefault(dtype_str(entry.dtype), {"tensors": 0, "bytes": 0})
        count["tensors"] += 1
        count["bytes"] += entry.nbytes
    names = [_relative(f, index.root) for f in index.files]
    files = [{"name": name, "tensors": per_file.get(name, 0), "file_bytes": f.stat().st_size}
             for name, f in zip(names, index.files)]
    out: dict[str, Any] = {
        "checkpoint": str(index.root), "format": index.format, "files": files,
        "tensors": len(index.entries), "total_bytes": index.total_bytes,
        "dtypes": dict(sorted(dtypes.items(), key=lambda item: -item[1]["bytes"])),
        "metadata": dict(index.metadata), "notes": list(index.notes),
    }
    if tensors:
        out["entries"] = [
            {"name": e.name, "dtype": dtype_str(e.dtype), "shape": list(e.shape),
             "bytes": e.nbytes, "file": _relative(e.file, index.root)}
            for e in index.entries.values()
        ]
    return out


def render(summary: dict[str, Any]) -> list[str]:
    from bigload.devices import format_size
    from bigload.errors import format_problems

    files = summary["files"]
    on_disk = sum(f["file_bytes"] for f in files)
    lines = [
        f"checkpoint '{summary['checkpoint']}' ({summary['format']})",
        f"  files:   {len(files)} ({format_size(on_disk)} on disk)",
        format_problems([f"  {f['name']:40} {f['tensors']:>6} tensors  "
                         f"{format_size(f['file_bytes']):>10}" for f in files]),
        f"  tensors: {summary['tensors']}",
        f"  bytes:   {format_size(summary['total_bytes'])} ({summary['total_bytes']:,})",
        "  dtypes:",
        *(f"    {name:10} {c['tensors']:>6} tensors  {format_size(c['bytes']):>10}"
          for name, c in summary["dtypes"].items()),
    ]
    if summary["metadata"]:
        lines.append("  metadata:")
        lines += [f"    {key}: {_short(value)}" for key, value in summary["metadata"].items()]
    if summary["notes"]:
        lines.append("  notes:")
        lines += [f"    {note}" for note in summary["notes"]]
    if "entries" in summary:
        lines.append("  tensors:")
        lines += [f"    {e['name']}  {e['dtype']}  {tuple(e['shape'])}  {e['file']}"
                  for e in summary["entries"]]
    return lines


def _relative(path: Any, root: Any) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _short(value: Any, limit: int = 100) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"
