"""accelerate's offload folders (``index.json`` of name → dtype and shape, one raw ``NAME.dat``
file per tensor), served by mmap as they are: ``dispatch_model(..., offload_index=...)``."""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OffloadError
from .store import OffloadStore, StoredTensor


def serve_accelerate_folder(
    model: nn.Module, offload_dir: str | os.PathLike | None, offload_index: Mapping[str, Any]
) -> OffloadStore:
    """A store of the tensors ``offload_index`` lists, each a view of its ``.dat`` file."""
    if offload_dir is None:
        raise OffloadError("offload_index is given without offload_dir: pass the folder that "
                           "holds its .dat files")
    folder = Path(offload_dir).resolve()
    store = OffloadStore()
    for name, info in offload_index.items():
        tensor, mm, size = _view(folder, name, info)
        store.add(StoredTensor(name, tensor, "disk", mm, (0, size),
                               file=folder / f"{name}.dat"))
    return store


def _view(folder: Path, name: str, info: Any) -> tuple[torch.Tensor, mmap.mmap, int]:
    dtype, shape = _spec(folder, name, info)
    path = (folder / f"{name}.dat").resolve()
    if path.parent != folder or not path.is_file():
        raise OffloadError(f"offload index names {name!r}, but '{path}' is not a file of "
                           f"'{folder}'; offload the model again")
    size = max(1, math.prod(shape)) * dtype.itemsize
    if path.stat().st_size != size:
        raise OffloadError(f"'{path}' has {path.stat().st_size} bytes; {name!r} "
                           f"({dtype}, {list(shape)}) needs {size}: offload the model again")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensor = torch.frombuffer(memoryview(mm), dtype=dtype)
    return (tensor[0] if not shape else tensor.view(shape)), mm, size


def _spec(folder: Path, name: str, info: Any) -> tuple[torch.dtype, tuple[int, ...]]:
    try:
        dtype = getattr(torch, str(info["dtype"]))
        shape = tuple(int(d) for d in info["shape"])
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise OffloadError(f"'{folder}': the offload index entry of {name!r} ({info!r}) is not "
                           "{'dtype': ..., 'shape': [...]}") from err
    if not isinstance(dtype, torch.dtype) or any(d < 0 for d in shape):
        raise OffloadError(f"'{folder}': {name!r} has dtype {info['dtype']!r} and shape "
                           f"{info['shape']!r}, which do not describe a tensor")
    return dtype, shape
