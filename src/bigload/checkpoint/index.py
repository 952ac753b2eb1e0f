"""The checkpoint index: every stored tensor's file, dtype, shape and byte range, read from file
headers only (safetensors, sharded safetensors, torch pickles). No tensor data is read."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from bigload.errors import CheckpointIndexError, CheckpointNotFoundError, format_problems

from ._files import os_error
from ._safetensors import read_safetensors_header
from ._shards import read_sharded
from ._torch_pickle import TORCH_SUFFIXES, read_torch_header
from ._types import CheckpointIndex, FileHeader, TensorEntry

__all__ = ["CheckpointIndex", "TensorEntry", "read_index"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Layout:
    """Where one format keeps its weights in a folder, best first."""

    format: str
    index_name: str  # standard shard index
    index_suffix: str  # any shard index
    single_name: str  # standard single file
    suffixes: tuple[str, ...]  # any weight file


_LAYOUTS = (
    _Layout("safetensors", "model.safetensors.index.json", ".safetensors.index.json",
            "model.safetensors", (".safetensors",)),
    _Layout("torch", "pytorch_model.bin.index.json", ".bin.index.json",
            "pytorch_model.bin", TORCH_SUFFIXES),
)  # fmt: skip
# Files a trainer writes next to the weights; they are never weights.
_NOT_WEIGHTS = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "rng_state")


def read_index(path: str | os.PathLike[str]) -> CheckpointIndex:
    """Index the checkpoint at ``path``: a weight file, a shard index, or a folder holding one."""
    target = _expand(Path(path))
    if _stat(target) is None:
        raise CheckpointNotFoundError(
            f"checkpoint '{target.absolute()}' does not exist. Pass a folder with "
            "model.safetensors (or shards and their *.index.json), a .safetensors file, or a "
            "torch .bin/.pt/.pth file."
        )
    if target.is_dir():
        root = target.resolve()
        sources, notes = _choose_files(root)
    else:
        root = target.parent.resolve()
        sources, notes = [root / target.name], []
    headers, metadata = _read_sources(sources)
    return _build(root, headers, metadata, notes)


def _expand(path: Path) -> Path:
    try:
        return path.expanduser()
    except RuntimeError as err:  # "~someone" with no such user
        raise CheckpointNotFoundError(f"checkpoint '{path}': {err}. Pass a full path.") from err


def _stat(path: Path) -> os.stat_result | None:
    """``path``'s stat (links followed), None when nothing is there; other OS errors typed."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as err:
        raise os_error(path, err) from err


def _choose_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The weight files of a folder (one shard index, or weight files); safetensors first."""
    listing = _list(folder)
    found = [(layout, _layout_files(folder, listing, layout)) for layout in _LAYOUTS]
    found = [(layout, files) for layout, files in found if files]
    if not found:
        raise CheckpointNotFoundError(_nothing_found(folder, listing))
    notes = [_note_many(folder, found[0][1])] if len(found[0][1]) > 1 else []
    if len(found) > 1:
        notes.append(
            f"preferred safetensors ({_names(found[0][1])}) over torch pickles "
            f"({_names(found[1][1])}) in '{folder}'"
        )
    for note in notes:
        logger.info(note)
    return found[0][1], notes


def _list(folder: Path) -> dict[str, bool]:
    """Name -> whether it is a folder, for every entry of ``folder`` (read once)."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name: _is_dir(entry) for entry in entries}
    except OSError as err:
        raise os_error(folder, err) from err


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False  # opening it reports why it cannot be read


def _layout_files(folder: Path, listing: dict[str, bool], layout: _Layout) -> list[Path]:
    """The files of ``layout`` in ``folder``. Anything that is not a folder counts as a file: a
    FIFO or device named like a checkpoint is refused when opened, not skipped in silence."""
    indexes = sorted(folder / name for name in listing if name.endswith(layout.index_suffix))
    if indexes:
        standard = folder / layout.index_name
        return [standard if standard in indexes else indexes[0]]
    if listing.get(layout.single_name) is False:
        return [folder / layout.single_name]
    return sorted(
        folder / name for name, is_dir in listing.items()
        if not is_dir and Path(name).suffix in layout.suffixes
        and not name.startswith(_NOT_WEIGHTS)
    )  # fmt: skip


def _note_many(folder: Path, files: list[Path]) -> str:
    return f"no shard index in '{folder}': read all {len(files)} weight files ({_names(files)})"


def _names(files: list[Path]) -> str:
    return ", ".join(f.name for f in files)


def _nothing_found(folder: Path, listing: dict[str, bool]) -> str:
    looked_for = [f"{layout.index_name} or *{layout.index_suffix}, {layout.single_name}, "
                  f"*{', *'.join(layout.suffixes)}" for layout in _LAYOUTS]  # fmt: skip
    present = sorted(listing)
    return (
        f"no checkpoint files in '{folder}'. Looked for:\n{format_problems(looked_for)}\n"
        f"Found {len(present)} entries"
        + (f":\n{format_problems(present)}" if present else " (the folder is empty)")
        + "\nPass the folder that holds the weights, or the weight file itself."
    )


def _read_sources(files: list[Path]) -> tuple[list[FileHeader], dict[str, str]]:
    if len(files) == 1 and files[0].name.endswith(".index.json"):
        return read_sharded(files[0], _read_file)
    headers = [_read_file(f) for f in files]
    return headers, dict(headers[0].metadata)


def _read_file(path: Path) -> FileHeader:
    if path.suffix == ".safetensors":
        return read_safetensors_header(path)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch_header(path)
    raise CheckpointNotFoundError(
        f"'{path}' is not a checkpoint file bigload reads: expected .safetensors, "
        f"{', '.join(TORCH_SUFFIXES)} or *.index.json. Pass the weight file or its folder."
    )


def _build(
    root: Path, headers: list[FileHeader], metadata: dict[str, str], notes: list[str]
) -> CheckpointIndex:
    formats = sorted({header.format for header in headers})
    if len(formats) > 1:
        raise CheckpointIndexError(
            f"checkpoint '{root}' mixes formats: {_names([h.file for h in headers])}. "
            "Keep one format per checkpoint (safetensors preferred)."
        )
    entries = _merge(root, headers)
    return CheckpointIndex(
        root=root,
        format=formats[0],
        files=tuple(header.file for header in headers),
        entries=MappingProxyType(entries),
        metadata=MappingProxyType(metadata),
        notes=tuple(notes + [note for header in headers for note in header.notes]),
        total_bytes=sum(entry.nbytes for entry in entries.values()),
        identities=MappingProxyType({header.file: header.identity for header in headers}),
    )


def _merge(root: Path, headers: list[FileHeader]) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    twice = []
    for entry in (e for header in headers for e in header.entries):
        if entry.name in entries:
            twice.append(f"'{entry.name}' is in '{entries[entry.name].file}' and '{entry.file}'")
        entries.setdefault(entry.name, entry)
    if twice:
        raise CheckpointIndexError(
            f"checkpoint '{root}' stores {len(twice)} tensor(s) in more than one file:\n"
            f"{format_problems(twice)}\nRemove the stale or duplicate files."
        )
    return entries
