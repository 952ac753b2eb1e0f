"""Sharded checkpoints: an ``*.index.json`` weight_map, checked against the shards it names.

Shard names never escape the index's folder; every tensor is in exactly the shard the index says.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Callable
from pathlib import Path

from bigload.errors import (
    CheckpointError,
    CheckpointIndexError,
    UnsafeCheckpointError,
    format_problems,
)

from ._files import open_regular, os_error
from ._json import MAX_JSON_BYTES, JsonProblem, parse_object
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
    metadata = _metadata(index_file, doc.get("metadata"))
    headers = [read_file(path) for path in _shard_paths(index_file, weight_map)]
    check_shards(index_file, weight_map, headers)
    return headers, metadata


def _load(index_file: Path) -> dict:
    fd, st = open_regular(index_file)
    with open(fd, "rb") as f:
        if st.st_size > MAX_JSON_BYTES:
            raise CheckpointIndexError(
                f"shard index '{index_file}' is {st.st_size} bytes, more than bigload reads "
                f"({MAX_JSON_BYTES} bytes, the names of ~300,000 tensors). {_REGENERATE}"
            )
        raw = _read(index_file, f, st.st_size)
    try:
        return parse_object(raw)
    except JsonProblem as err:
        raise CheckpointIndexError(
            f"shard index '{index_file}' is refused: {err}. {_REGENERATE}"
        ) from err


def _read(index_file: Path, f, size: int) -> bytes:
    try:
        return f.read(size + 1)  # a file growing while it is read is cut at the cap
    except OSError as err:
        raise os_error(index_file, err) from err


def _weight_map(index_file: Path, doc: dict) -> dict[str, str]:
    # transformers writes {"metadata": ..., "weight_map": {...}}; accelerate also reads a bare
    # {tensor: file} map
    weight_map = doc.get("weight_map", doc if "metadata" not in doc else None)
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointIndexError(
            f"shard index '{index_file}' has no 'weight_map' of tensor name -> shard file name "
            f"(found {reprlib.repr(weight_map)}). {_REGENERATE}"
        )
    wrong = [f"{reprlib.repr(name)}: {reprlib.repr(shard)}"
             for name, shard in weight_map.items() if not isinstance(shard, str)]  # fmt: skip
    if wrong:
        raise CheckpointIndexError(
            f"shard index '{index_file}': {len(wrong)} 'weight_map' value(s) are not shard file "
            f"names (strings):\n{format_problems(wrong)}\n{_REGENERATE}"
        )
    return weight_map


def _metadata(index_file: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise CheckpointIndexError(
            f"shard index '{index_file}': 'metadata' is a {type(metadata).__name__}, not an "
            f"object such as {{\"total_size\": 123}}. {_REGENERATE}"
        )
    return {key: str(value) for key, value in metadata.items()}


def _shard_paths(index_file: Path, weight_map: dict[str, str]) -> list[Path]:
    root = index_file.parent
    names = sorted(set(weight_map.values()))
    unsafe = [_named(name) for name in names if not _stays_inside(name)]
    if unsafe:
        raise UnsafeCheckpointError(
            f"shard index '{index_file}' names {len(unsafe)} file(s) outside its folder "
            f"'{root}':\n{format_problems(unsafe)}\nShard names must be relative paths inside "
            "the checkpoint folder; bigload does not follow them. Fix the index."
        )
    paths = {name: root / os.path.normpath(name) for name in names}
    counts: dict[str, int] = {}
    for name in weight_map.values():
        counts[name] = counts.get(name, 0) + 1
    missing = [f"{_quoted(path)} (named for {counts[name]} tensors{_why_missing(path)})"
               for name, path in paths.items() if not _is_file(path)]  # fmt: skip
    if missing:
        raise CheckpointIndexError(
            f"shard index '{index_file}' names {len(missing)} shard(s) that do not exist or "
            f"cannot be read:\n{format_problems(missing)}\nDownload the missing shards into "
            f"'{root}' (or fix the names in the index)."
        )
    return list(dict.fromkeys(paths.values()))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _why_missing(path: Path) -> str:
    """Why a shard cannot be opened, when it is not simply absent."""
    try:
        fd, _ = open_regular(path)
    except CheckpointError as err:
        reason = str(err)
        return "" if "does not exist" in reason else f"; {reason}"
    os.close(fd)
    return ""


def _named(name: str) -> str:
    return repr(name) if len(name) <= 300 else f"{name[:297]!r}..."


def _quoted(path: Path) -> str:
    text = str(path)
    return f"'{text}'" if len(text) <= 300 else f"'{text[:297]}...'"


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
