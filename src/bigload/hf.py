"""One call for transformers checkpoints: resolve the folder, build the skeleton from its config
(transformers' declarations honoured), plan, load, dispatch. transformers is an optional extra.

A sentence-transformers folder (``modules.json``) loads as a :class:`SentenceEncoder`: its
transformer placed by bigload, plus the folder's pooling and normalisation, with an ``encode()``
like sentence-transformers'. (We do not build a ``SentenceTransformer`` object: it would load the
weights a second time, eagerly, with its own loader.)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointIndex, read_index
from .devices import parse_dtype
from .errors import ModelResolveError
from .hf_conversions import prepare_checkpoint
from .skeleton import init_empty_weights

logger = logging.getLogger(__name__)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ModelResolveError(
            "loading a model folder needs transformers: pip install 'bigload[hf]'"
        ) from err
    return transformers


def resolve_model_path(path_or_id: str | os.PathLike) -> Path:
    """A local folder with config.json, or a model id found in the local Hugging Face cache
    (resolved offline; nothing is downloaded)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise ModelResolveError(
                f"'{path.resolve()}' has no config.json: bigload.load needs a transformers model "
                "folder (config.json + weights). For a bare checkpoint use "
                "bigload.load_checkpoint_and_dispatch(model, path, ...)."
            )
        return path.resolve()
    if path.exists():
        raise ModelResolveError(f"'{path.resolve()}' is a file; pass the model's folder")
    return _from_hub_cache(str(path_or_id))


def _from_hub_cache(model_id: str) -> Path:
    if model_id.count("/") > 1 or not model_id.strip():
        raise ModelResolveError(f"'{model_id}' is neither a folder nor a model id ('org/name')")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model_id, local_files_only=True)
    except ImportError as err:
        raise ModelResolveError(
            f"'{model_id}' is not a folder, and huggingface_hub (to look in the local cache) is "
            "not installed: pip install 'bigload[hf]'"
        ) from err
    except Exception as err:  # huggingface_hub raises several kinds here
        raise ModelResolveError(
            f"'{model_id}' is not a local folder and not in the Hugging Face cache "
            f"({type(err).__name__}). bigload never downloads: fetch it first (e.g. "
            f"`hf download {model_id}`) or pass a folder path."
        ) from err
    return Path(folder)


def model_dtype(config: Any, index: CheckpointIndex, dtype: torch.dtype | str | None) -> Any:
    """transformers' ``dtype="auto"``: the config's dtype, else the checkpoint's first float."""
    if dtype not in (None, "auto"):
        return parse_dtype(dtype, floating=True)
    configured = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(
        config, "torch_dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if isinstance(configured, torch.dtype):
        return configured
    for entry in index.entries.values():
        if entry.dtype.is_floating_point:
            return entry.dtype
    return torch.float32


def model_class_for(config: Any, model_class: Any = None) -> Any:
    """The class to build: ``model_class``, else ``config.architectures[0]``, else AutoModel."""
    transformers = _transformers()
    if model_class is not None:
        return getattr(transformers, model_class) if isinstance(model_class, str) else model_class
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
        logger.warning("architecture %r is not in transformers; trying the Auto classes", name)
    return transformers.AutoModel


@contextmanager
def _no_init_on_meta() -> Iterator[None]:
    """transformers runs its weight initialisers in ``post_init``; on meta tensors they do
    nothing, slowly (a third of a 1 GB Llama's load). Skip them for meta tensors only: real
    tensors (non-persistent buffers) are still initialised."""
    try:
        from transformers import initialization
    except ImportError:  # transformers < 5: nothing to skip
        yield
        return
    table = initialization.TORCH_INIT_FUNCTIONS
    saved = dict(table)

    def skipping_meta(fn: Any) -> Any:
        def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return tensor if tensor.device.type == "meta" else fn(tensor, *args, **kwargs)
        return init

    table.update({name: skipping_meta(fn) for name, fn in saved.items()})
    try:
        yield
    finally:
        table.update(saved)


def build_skeleton(config: Any, cls: Any, dtype: torch.dtype) -> nn.Module:
    """The model on ``meta`` (non-persistent buffers real), in ``dtype``, ties made."""
    with init_empty_weights(), _no_init_on_meta():
        if hasattr(cls, "from_config") and not hasattr(cls, "_from_config"):
            model = cls.from_config(config, dtype=dtype)
        else:
            model = cls._from_config(config, dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def init_fn_for(model: nn.Module) -> Any:
    """transformers' own initialisation of one module, for ``missing="init"``."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        return None

    def init_module(module: nn.Module) -> None:
        init(module)

    init_module.__qualname__ = f"{type(model).__name__}._init_weights"
    return init_module


def load(
    path_or_id: str | os.PathLike,
    *,
    device_map: Any = "auto",
    max_memory: Mapping[Any, int | str] | None = None,
    dtype: torch.dtype | str | None = None,
    offload_dir: str | os.PathLike | None = None,
    missing: str | None = None,
    model_class: Any = None,
    progress: bool | None = None,
    prefetch: int | None = None,
    no_split_module_classes: Sequence[str] | None = None,
) -> nn.Module:
    """Load a transformers model folder (or a cached model id) ready to run.

    Plans over ``max_memory`` (default: free accelerator memory, most of the RAM, then disk),
    loads every tensor to its place and attaches the hooks. Missing weights are initialised
    with the model's own ``_init_weights`` and reported (``missing="error"`` refuses). The plan
    and the LoadReport are ``model.bigload_plan`` and ``model.bigload_report``.
    """
    folder = resolve_model_path(path_or_id)
    options = dict(
        device_map=device_map, max_memory=max_memory, dtype=dtype, offload_dir=offload_dir,
        missing=missing, model_class=model_class, progress=progress, prefetch=prefetch,
        no_split_module_classes=no_split_module_classes,
    )
    if (folder / "modules.json").is_file():
        from .sentence import load_sentence_encoder

        return load_sentence_encoder(folder, **options)
    return load_transformers_model(folder, **options)


def load_transformers_model(
    folder: Path,
    *,
    device_map: Any = "auto",
    max_memory: Mapping[Any, int | str] | None = None,
    dtype: torch.dtype | str | None = None,
    offload_dir: str | os.PathLike | None = None,
    missing: str | None = None,
    model_class: Any = None,
    progress: bool | None = None,
    prefetch: int | None = None,
    no_split_module_classes: Sequence[str] | None = None,
) -> nn.Module:
    from .compat.accelerate import load_checkpoint_and_dispatch

    model, index, _config, target_dtype = _skeleton(folder, dtype, model_class)
    no_split = _no_split(model, no_split_module_classes)
    index, key_map = prepare_checkpoint(model, index, checkpoint_key_map(model))
    load_checkpoint_and_dispatch(
        model, index, device_map=device_map, max_memory=max_memory,
        no_split_module_classes=no_split, offload_folder=offload_dir, dtype=target_dtype,
        keep_in_fp32_modules=_keep_in_fp32(model, target_dtype),
        missing=missing or "init",  # type: ignore[arg-type]
        init_fn=init_fn_for(model), progress=progress, prefetch=prefetch, key_map=key_map,
    )
    _load_generation_config(model, folder, _transformers())
    model.eval()
    return model


def _no_split(model: nn.Module, given: Sequence[str] | None) -> list[str] | None:
    """The no-split classes: the caller's, else the model's declared ``_no_split_modules``."""
    if given is not None:
        return list(given)
    return list(getattr(model, "_no_split_modules", None) or []) or None


def _keep_in_fp32(model: nn.Module, dtype: torch.dtype) -> list[str] | None:
    names = getattr(model, "_keep_in_fp32_modules", None) or []
    strict = getattr(model, "_keep_in_fp32_modules_strict", None) or []
    if dtype == torch.float32:
        return None
    keep = list(strict) + (list(names) if dtype == torch.float16 else [])
    return keep or None


def checkpoint_key_map(model: nn.Module) -> dict[str, str] | None:
    """Renames transformers applies to this model's checkpoints
    (``_checkpoint_conversion_mapping``, regex → replacement)."""
    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    return dict(mapping) or None


def _load_generation_config(model: nn.Module, folder: Path, transformers: Any) -> None:
    if not (folder / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        logger.warning("ignoring generation_config.json in %s: %s", folder, err)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- the model of a folder without its weights (the CLI's plan and verify) ---------------------
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"


def transformer_folder(folder: Path) -> Path:
    """The folder holding the transformers model: ``folder``, or for a sentence-transformers
    folder (``modules.json``) the path of its Transformer module."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return folder
    for module in read_json(modules):
        if module.get("type") == _ST_TRANSFORMER:
            return folder / module.get("path", "")
    raise ModelResolveError(f"'{modules}' has no {_ST_TRANSFORMER} module")


def build_model_skeleton(
    path_or_id: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
    model_class: Any = None,
) -> tuple[nn.Module, CheckpointIndex, Any]:
    """``(model, index, config)``: the model :func:`load` would build, on ``meta`` in the dtype
    it would use (:func:`model_dtype`), with the checkpoint's index. Reads no tensor data."""
    folder = transformer_folder(resolve_model_path(path_or_id))
    model, index, config, _dtype = _skeleton(folder, dtype, model_class)
    return model, index, config


def _skeleton(
    folder: Path, dtype: torch.dtype | str | None, model_class: Any
) -> tuple[nn.Module, CheckpointIndex, Any, torch.dtype]:
    config = _transformers().AutoConfig.from_pretrained(folder)
    index = read_index(folder)
    target_dtype = model_dtype(config, index, dtype)
    model = build_skeleton(config, model_class_for(config, model_class), target_dtype)
    return model, index, config, target_dtype


def plan_model(
    model: nn.Module, *, dtype: torch.dtype, max_memory: Mapping[Any, int | str] | None = None,
    strategy: str = "auto", no_split_module_classes: Sequence[str] | None = None,
    prefetch: int | None = None,
) -> Any:
    """The DevicePlan :func:`load` would make for a skeleton from :func:`build_model_skeleton`."""
    from .plan import plan_devices

    no_split = _no_split(model, no_split_module_classes)
    return plan_devices(
        model, max_memory=max_memory, strategy=strategy,  # type: ignore[arg-type]
        no_split_module_classes=no_split, dtype=dtype,
        keep_in_fp32_modules=_keep_in_fp32(model, dtype), prefetch=prefetch,
    )


def verify_model(model: nn.Module, index: CheckpointIndex) -> Any:
    """The VerifyReport :func:`load` would act on (same key map as the load)."""
    from .preflight import verify

    index, key_map = prepare_checkpoint(model, index, checkpoint_key_map(model))
    return verify(model, index, key_map=key_map)
