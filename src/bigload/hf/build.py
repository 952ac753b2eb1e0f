"""A transformers model without its weights: the config (with overrides), the class, the dtype,
the skeleton on meta (ties made, transformers' initialisers skipped on meta), and what the
model declares (no-split classes, fp32 modules, checkpoint renames); the plan and verify
report ``bigload.load`` would make for it."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointIndex, read_index
from ..devices import parse_dtype
from ..errors import ModelResolveError, RemoteCodeError
from ..hf_args import model_class_from, refuse_unknown, remote_auto_class
from ..hf_conversions import prepare_checkpoint
from ..plan import plan_devices
from ..preflight import verify
from ..skeleton import init_empty_weights
from .options import ACCEPTED_ARGUMENTS, HubSource, read_json, transformers_module
from .resolve import resolve_model_path, transformer_folder

logger = logging.getLogger(__name__)


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


def model_class_for(config: Any, model_class: Any = None,
                    trust_remote_code: bool | None = None) -> Any:
    """The class to build: ``model_class`` (class, class name, Auto class or task name), else
    ``config.architectures[0]`` from transformers, else the Auto class of the model's own code
    (``auto_map``, only with ``trust_remote_code=True``), else AutoModel."""
    transformers = transformers_module()
    if model_class is not None:
        return model_class_from(model_class, transformers)
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    remote = remote_auto_class(config, transformers)
    if remote is not None:
        if not trust_remote_code:
            raise _remote_code_error(getattr(config, "_name_or_path", ""),
                                     getattr(config, "auto_map", None))
        return remote
    if getattr(config, "architectures", None):
        logger.warning("architecture %r is not in transformers; building AutoModel",
                       config.architectures[0])
    return transformers.AutoModel


def _remote_code_error(where: str, auto_map: Any) -> RemoteCodeError:
    refs = ", ".join(f"{k}: {v}" for k, v in (auto_map or {}).items())
    return RemoteCodeError(
        f"'{where or 'the model folder'}' needs code from the model's own files "
        f"({refs or 'auto_map'}), which bigload.load runs only with trust_remote_code=True. "
        "Read that code, then pass trust_remote_code=True if you trust it.")


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


def build_skeleton(config: Any, cls: Any, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    """The model on ``meta`` (non-persistent buffers real), in ``dtype``, ties made. ``kwargs``
    go to ``from_config`` (``attn_implementation``; ``trust_remote_code`` for Auto classes)."""
    with init_empty_weights(), _no_init_on_meta():
        if hasattr(cls, "from_config") and not hasattr(cls, "_from_config"):
            model = cls.from_config(config, dtype=dtype, **kwargs)
        else:
            kwargs.pop("trust_remote_code", None)  # a model class is the code to run already
            model = cls._from_config(config, dtype=dtype, **kwargs)
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


def model_config(folder: Path, given: Any = None, overrides: Mapping[str, Any] | None = None,
                 trust_remote_code: bool | None = None) -> Any:
    """``given`` (a config, or a path to one) or the folder's config, with ``overrides`` set
    (as ``from_pretrained`` does with config attributes passed as keywords)."""
    if given is None or isinstance(given, (str, os.PathLike)):
        config = _auto_config(Path(given) if given is not None else folder, trust_remote_code)
    else:
        config = copy.deepcopy(given)
    unknown = [name for name in overrides or {} if not hasattr(config, name)]
    refuse_unknown(unknown, list(ACCEPTED_ARGUMENTS), f"attributes of {type(config).__name__}")
    for name, value in (overrides or {}).items():
        setattr(config, name, value)
    return config


def check_model_folder(folder: Path) -> None:
    """A ModelResolveError naming the file for what would otherwise surface as a traceback from
    transformers: a config.json or modules.json that is not JSON, or a model_type this
    transformers does not know."""
    config = folder / "config.json"
    if (folder / "modules.json").is_file():
        for module in read_json(folder / "modules.json", list):
            sub = folder / str(module.get("path", "")) / "config.json"
            if sub.is_file() and "model_type" in read_json(sub, dict):
                config = sub
                break
    if config.is_file():
        _check_model_type(config, read_json(config, dict))


def _check_model_type(path: Path, config: dict[str, Any]) -> None:
    transformers = transformers_module()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "auto_map" in config:  # the model's own code: bigload.load asks for trust_remote_code
        return
    model_type = config.get("model_type")
    if model_type is None:
        raise ModelResolveError(
            f"'{path}' has no model_type, so transformers cannot tell which model it describes; "
            "add it (e.g. \"model_type\": \"llama\") or save the config with save_pretrained")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelResolveError(
            f"'{path}' has model_type {model_type!r}, which transformers "
            f"{transformers.__version__} does not know. If the model is newer than this "
            "transformers, upgrade it: pip install -U transformers")


def _auto_config(folder: Path, trust_remote_code: bool | None) -> Any:
    check_model_folder(folder)
    try:
        return transformers_module().AutoConfig.from_pretrained(
            folder, trust_remote_code=bool(trust_remote_code))
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        auto_map = read_json(folder / "config.json").get("auto_map")
        raise _remote_code_error(str(folder), auto_map) from err


def no_split_classes(model: nn.Module, given: Sequence[str] | None) -> list[str] | None:
    """The no-split classes: the caller's, else the model's declared ``_no_split_modules``."""
    if given is not None:
        return list(given)
    return list(getattr(model, "_no_split_modules", None) or []) or None


def keep_in_fp32_for(model: nn.Module, dtype: torch.dtype) -> list[str] | None:
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


def build_model_skeleton(
    path_or_id: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
    model_class: Any = None,
) -> tuple[nn.Module, CheckpointIndex, Any]:
    """``(model, index, config)``: the model :func:`load` would build, on ``meta`` in the dtype
    it would use (:func:`model_dtype`), with the checkpoint's index. Reads no tensor data, and
    a model id only from the local cache (planning downloads nothing)."""
    folder = resolve_model_path(path_or_id, source=HubSource(local_files_only=True))
    model, index, config, _dtype = _skeleton(transformer_folder(folder), dtype, model_class)
    return model, index, config


def _skeleton(
    folder: Path, dtype: torch.dtype | str | None, model_class: Any
) -> tuple[nn.Module, CheckpointIndex, Any, torch.dtype]:
    config = model_config(folder)
    index = read_index(folder)
    target_dtype = model_dtype(config, index, dtype)
    model = build_skeleton(config, model_class_for(config, model_class), target_dtype)
    return model, index, config, target_dtype


def plan_model(
    model: nn.Module, *, dtype: torch.dtype, max_memory: Mapping[Any, int | str] | None = None,
    strategy: str = "auto", no_split_module_classes: Sequence[str] | None = None,
    prefetch: int | None = None, offload_buffers: bool = False,
    headroom_bytes: int | str | None = None,
    index: CheckpointIndex | None = None, world: int = 1, context_tokens: int | None = None,
) -> Any:
    """The DevicePlan :func:`load` makes for a skeleton from :func:`build_model_skeleton`
    (over ``world`` ranks: with each stage's KV cache and logits counted)."""

    no_split = no_split_classes(model, no_split_module_classes)
    extra = stage_extra_bytes(model, dtype, context_tokens) if world > 1 else None
    return plan_devices(
        model, max_memory=max_memory, strategy=strategy,  # type: ignore[arg-type]
        no_split_module_classes=no_split, dtype=dtype, offload_buffers=offload_buffers,
        headroom_bytes=headroom_bytes, keep_in_fp32_modules=keep_in_fp32_for(model, dtype),
        prefetch=prefetch, index=index, world=world, extra_bytes=extra,
    )


def stage_extra_bytes(model: nn.Module, dtype: torch.dtype,
                      context_tokens: int | None = None) -> dict[str, int]:
    """What a rank keeps besides weights for the modules of a transformers model (module fqn →
    bytes), an estimate from its config: each decoder block's KV cache for ``context_tokens``
    tokens (default: min(4096, the model's positions)) and the head's logits (in ``dtype``) for
    as many — a forward over the whole context. Models without a decoder (encoders) keep only
    the head's."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    positions = getattr(text, "max_position_embeddings", None) or 4096
    tokens = context_tokens if context_tokens is not None else min(4096, positions)
    extra: dict[str, int] = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    if head is not None and id(head) in names and getattr(head, "weight", None) is not None:
        extra[names[id(head)]] = tokens * head.weight.shape[0] * dtype.itemsize
    per_token = _kv_bytes_per_token(text, dtype)
    for name in _decoder_blocks(model, names):
        extra[name] = extra.get(name, 0) + tokens * per_token
    return extra


def _kv_bytes_per_token(text: Any, dtype: torch.dtype) -> int:
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None) or 1
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or 0
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden else 0)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if getattr(text, "multi_query", False):
        kv_heads = 1
    return 2 * kv_heads * head_dim * dtype.itemsize


def _decoder_blocks(model: nn.Module, names: dict[int, str]) -> list[str]:
    """fqns of the no-split blocks that keep a KV cache: every block of a decoder-only model,
    the decoder's blocks of an encoder-decoder, none of an encoder."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        if decoder is None or id(decoder) not in names:
            return []
        prefix = names[id(decoder)] + "."
    elif getattr(config, "is_decoder", False) or type(model).__name__.endswith(
            ("ForCausalLM", "LMHeadModel")):
        prefix = ""
    else:
        return []
    return [n for n, m in model.named_modules()
            if type(m).__name__ in classes and n.startswith(prefix)]


def verify_model(model: nn.Module, index: CheckpointIndex) -> Any:
    """The VerifyReport :func:`load` would act on (same key map as the load)."""

    index, key_map = prepare_checkpoint(model, index, checkpoint_key_map(model))
    return verify(model, index, key_map=key_map)
