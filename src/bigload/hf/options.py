"""What :func:`bigload.load` was asked, translated once: ``LoadOptions`` (how one transformers
model is planned and loaded), ``HubSource`` (where a model id is fetched from), and the names
``bigload.load`` accepts."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelResolveError

logger = logging.getLogger(__name__)


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ModelResolveError(
            "loading a model folder needs transformers: pip install 'bigload[hf]'"
        ) from err
    return transformers


@dataclass(frozen=True)
class LoadOptions:
    """How bigload plans and loads one transformers model: :func:`load`'s arguments, translated."""

    device_map: Any = "auto"
    max_memory: Mapping[Any, int | str] | None = None
    dtype: torch.dtype | str | None = None
    offload_dir: str | os.PathLike | None = None
    missing: str | None = None
    progress: bool | None = None
    prefetch: int | None = None
    no_split_module_classes: Sequence[str] | None = None
    offload_buffers: bool = False
    headroom_bytes: int | str | None = None
    ignore_mismatched_sizes: bool = False
    attn_implementation: str | None = None
    key_mapping: Mapping[str, str] | None = None
    trust_remote_code: bool | None = None
    world: int | str | None = None  # several torch.distributed ranks (bigload.distributed)
    timeout: float | None = None  # seconds a rank waits for another
    context_tokens: int | None = None  # KV-cache tokens each stage keeps room for
    ranks: Any = None  # the group, once joined


@dataclass(frozen=True)
class HubSource:
    """Where a model id is fetched from: ``from_pretrained``'s hub arguments."""

    revision: str | None = None
    token: bool | str | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    force_download: bool = False


def read_json(path: Path, kind: type | None = None) -> Any:
    """The JSON document of ``path`` (of type ``kind`` when given); a ModelResolveError naming
    the file when it is not UTF-8 JSON of that type."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelResolveError(f"'{path}' is not UTF-8 text ({err})") from err
    except json.JSONDecodeError as err:
        raise ModelResolveError(
            f"'{path}' is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. "
            "Fix the file, or write it again with save_pretrained.") from err
    if kind is not None and not isinstance(data, kind) or (
            kind is list and not all(isinstance(m, dict) for m in data)):
        raise ModelResolveError(f"'{path}' holds a JSON {type(data).__name__}; expected "
                                f"{'a list of objects' if kind is list else 'an object'}")
    return data


ACCEPTED_ARGUMENTS: tuple[str, ...] = (
    "device_map", "max_memory", "dtype", "offload_dir", "missing", "model_class", "progress",
    "prefetch", "no_split_module_classes", "offload_buffers", "headroom_bytes", "config",
    "ignore_mismatched_sizes", "attn_implementation", "trust_remote_code", "key_mapping",
    "revision", "subfolder", "token", "cache_dir", "local_files_only", "force_download",
    "world", "timeout", "context_tokens",
)  # bigload.load's keyword arguments (a test checks they match its signature)
