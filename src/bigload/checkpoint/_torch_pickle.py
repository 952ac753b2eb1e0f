"""torch pickles (``.bin``, ``.pt``, ``.pth``): loaded only with ``weights_only=True`` and
``mmap=True``, so no arbitrary object is built and no tensor byte is copied."""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from bigload.errors import CorruptCheckpointError, UnsafeCheckpointError

from ._types import FileHeader, TensorEntry

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# Training scripts save a whole checkpoint dict; the weights sit under one of these keys.
_WRAPPER_KEYS = ("state_dict", "model")


def read_torch_header(path: Path) -> FileHeader:
    """Entries (dtype, shape; no byte ranges) of one torch pickle."""
    state_dict, notes = load_state_dict(path)
    entries = [
        TensorEntry(name, path, t.dtype, tuple(t.shape), None) for name, t in state_dict.items()
    ]
    return FileHeader(path, "torch", entries, notes=notes)


def load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The file's tensors (memory-mapped CPU tensors) by name, and notes on what was unwrapped
    or skipped."""
    obj, notes = _unwrap(path, _torch_load(path))
    if not isinstance(obj, Mapping):
        raise CorruptCheckpointError(
            f"torch file '{path}' holds a {type(obj).__name__}, not a state dict (name -> "
            "tensor). Save `model.state_dict()` instead."
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    skipped = [repr(k) for k in obj if k not in tensors]
    if skipped:
        notes.append(f"skipped {len(skipped)} non-tensor entries of '{path}': {', '.join(skipped)}")
        logger.info(notes[-1])
    return tensors, notes


def _torch_load(path: Path) -> object:
    if not zipfile.is_zipfile(path):
        raise CorruptCheckpointError(
            f"torch file '{path}' is not a zip checkpoint of torch.save (torch >= 1.6): it is "
            "corrupted, or in the legacy format that cannot be memory-mapped. Re-save it with "
            "torch.save, or convert it with safetensors.torch.save_file."
        )
    try:
        return torch.load(str(path), mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"torch file '{path}' holds objects that torch.load(weights_only=True) refuses "
            f"({_reason(err)}). bigload never unpickles arbitrary objects: if you trust the file, "
            "load it yourself and save its state dict with safetensors.torch.save_file."
        ) from err
    except (RuntimeError, EOFError, ValueError) as err:
        raise CorruptCheckpointError(
            f"torch file '{path}' cannot be read ({err}). It is truncated or corrupted; "
            "download or save it again."
        ) from err


def _reason(err: Exception) -> str:
    """The line of torch's long weights_only message that names the refused object."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "WeightsUnpickler error" in line]
    return (named or lines or [type(err).__name__])[0].split(". Please use")[0]


def _unwrap(path: Path, obj: object) -> tuple[object, list[str]]:
    if not isinstance(obj, Mapping):
        return obj, []
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            note = f"read the state dict under key '{key}' of '{path}'"
            logger.info(note)
            return obj[key], [note]
    return obj, []
