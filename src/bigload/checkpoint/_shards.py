"""Sharded checkpoints: an ``*.index.json`` weight_map, checked against the shards it names.

Shard names never escape the index's folder; every tensor is in exactly the shard the index says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from bigload.errors import CheckpointIndexError, UnsafeCheckpointError, format_problems

from ._types import FileHeader

_REGENERATE = (
    "Regenerate the index with the tool that wrote the shards, or delete it and pass the shard "
    "files' folder so bigload reads the shards alone."
)


def read_sharded(
    index_file: Path, read_file: Callable[[Path], FileHeader]
) -> tuple[list[FileHeader], dict[str, str]]:
    """Headers of every shard the index names (sorted by file name) and the index metadata."""
    doc = _load(index_file)
    weight_map = _weight_map(index_file, doc)
    headers = [read_file(path) for path in _shard_paths(index_file, weight_map)]
    check_shards(index_file, weight_map, headers)
    metadata = doc.get("metadata")
    return headers, {str(k): str(v) for k, v in (metadata or {}).items()}


def _load(index_file: Path) -> dict:
    try:
        doc = json.loads(index_file.read_bytes())
    except ValueError as err:
        raise CheckpointIndexError(
            f"shard index '{index_file}' is not valid JSON ({err}). {_REGENERATE}"
        ) from err
    if not isinstance(doc, dict):
        raise CheckpointIndexError(
            f"shard index '{index_file}' is not a JSON object. {_REGENERATE}"
        )
    return doc


def _weight_map(index_file: Path, doc: dict) -> dict[str, str]:
    # transformers writes {"metadata": ..., "weight_map": {...}}; accelerate also reads a bare
    # {tensor: file} map
    weight_map = doc.get("weight_map", doc if "metadata" not in doc else None)
    valid = isinstance(weight_map, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    )
    if not valid or not weight_map:
        raise CheckpointIndexError(
            f"shard index '{index_file}' has no 'weight_map' of tensor name -> shard file name. "
            f"{_REGENERATE}"
        )
    return weight_map


def _shard_paths(index_file: Path, weight_map: dict[str, str]) -> list[Path]:
    root = index_file.parent
    names = sorted(set(weight_map.values()))
    unsafe = [repr(name) for name in names if not _stays_inside(name)]
    if unsafe:
        raise UnsafeCheckpointError(
            f"shard index '{index_file}' names {len(unsafe)} file(s) outside its folder "
            f"'{root}':\n{format_problems(unsafe)}\nShard names must be relative paths inside "
            "the checkpoint folder; bigload does not follow them. Fix the index."
        )
    paths = {name: root / os.path.normpath(name) for name in names}
    missing = [f"'{path}' (named for {list(weight_map.values()).count(name)} tensors)"
               for name, path in paths.items() if not path.is_file()]  # fmt: skip
    if missing:
        raise CheckpointIndexError(
            f"shard index '{index_file}' names {len(missing)} shard(s) that do not exist:\n"
            f"{format_problems(missing)}\nDownload the missing shards into '{root}'."
        )
    return list(dict.fromkeys(paths.values()))


def _stays_inside(name: str) -> bool:
    """True for a relative path that stays inside its folder (checked on the name, not by
    resolving: a hub cache links shards to blobs elsewhere, which is fine)."""
    normal = os.path.normpath(name)
    escapes = os.path.isabs(normal) or normal.split(os.sep)[0] == ".."
    return bool(name) and normal != "." and not escapes


def check_shards(index_file: Path, weight_map: dict[str, str], headers: list[FileHeader]) -> None:
    """Raise once for every tensor the index omits, misplaces, or finds in two shards."""
    root = index_file.parent
    stored: dict[str, list[Path]] = {}
    for header in headers:
        for entry in header.entries:
            stored.setdefault(entry.name, []).append(header.file)
    problems = [_two_shards(n, files) for n, files in stored.items() if len(files) > 1]
    problems += [f"'{n}' is in shard '{files[0].name}' but not in the index"
                 for n, files in stored.items() if n not in weight_map]  # fmt: skip
    problems += [_misplaced(n, shard, stored.get(n, [])) for n, shard in weight_map.items()
                 if root / os.path.normpath(shard) not in stored.get(n, [])]  # fmt: skip
    if problems:
        raise CheckpointIndexError(
            f"shard index '{index_file}' does not match its shards "
            f"({_count(problems, 'problem')}):\n"
            f"{format_problems(problems)}\n{_REGENERATE}"
        )


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _two_shards(name: str, files: list[Path]) -> str:
    return f"'{name}' is stored in {len(files)} shards: " + ", ".join(f"'{f.name}'" for f in files)


def _misplaced(name: str, shard: str, files: list[Path]) -> str:
    where = ", ".join(f"'{f.name}'" for f in files) or "no shard the index names"
    return f"'{name}': the index says shard '{shard}', which does not contain it (it is in {where})"
