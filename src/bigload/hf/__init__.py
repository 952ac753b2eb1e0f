"""One call for transformers and sentence-transformers checkpoints: resolve the folder (a local
one, or a model id fetched from the Hugging Face Hub), build the skeleton from its config
(transformers' declarations honoured), plan, load, dispatch. transformers is an optional extra.

:func:`load` takes ``from_pretrained``'s arguments (``hf_args`` translates them once). A
sentence-transformers folder (``modules.json``) loads as the library's own object
(``SentenceTransformer``, ``CrossEncoder``, ...), its transformers models loaded by bigload
(``sentence_transformers_compat``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import sentence_transformers_compat as st
from ..errors import UnsupportedArgumentError
from ..hf_args import pick, translate_kwargs
from .build import (
    build_model_skeleton,
    build_skeleton,
    check_model_folder,
    checkpoint_key_map,
    init_fn_for,
    model_class_for,
    model_dtype,
    plan_model,
    stage_extra_bytes,
    verify_model,
)
from .options import ACCEPTED_ARGUMENTS, HubSource, LoadOptions, read_json
from .pretrained import load_pretrained, load_transformers_model
from .resolve import resolve_model_path, transformer_folder

__all__ = [
    "ACCEPTED_ARGUMENTS",
    "HubSource",
    "LoadOptions",
    "accepted_arguments",
    "build_model_skeleton",
    "build_skeleton",
    "check_model_folder",
    "checkpoint_key_map",
    "init_fn_for",
    "load",
    "load_pretrained",
    "load_transformers_model",
    "model_class_for",
    "model_dtype",
    "plan_model",
    "stage_extra_bytes",
    "read_json",
    "resolve_model_path",
    "transformer_folder",
    "verify_model",
]


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
    offload_buffers: bool = False,
    headroom_bytes: int | str | None = None,
    config: Any = None,
    ignore_mismatched_sizes: bool = False,
    attn_implementation: str | None = None,
    trust_remote_code: bool | None = None,
    key_mapping: Mapping[str, str] | None = None,
    revision: str | None = None,
    subfolder: str = "",
    token: bool | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    world: int | str | None = None,
    timeout: float | None = None,
    context_tokens: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a transformers or sentence-transformers model folder, or a Hub model id, ready to run.

    Plans over ``max_memory`` (default: free accelerator memory, most of the RAM, then disk;
    ``headroom_bytes`` kept free for activations, ``offload_buffers`` to offload buffers too),
    loads every tensor to its place and attaches the hooks. Missing weights are initialised with
    the model's own ``_init_weights``, logged as a warning and reported (``missing="error"``
    refuses). The plan and the LoadReport are ``model.bigload_plan`` and
    ``model.bigload_report``. ``progress``: no bar by default (the library logs), ``True`` for
    tqdm's, or a callable ``factory(total_bytes) -> bar`` (``update(n)``, ``close()``); a Hub
    download shows huggingface_hub's own bars unless ``progress=False``.

    Takes ``from_pretrained``'s arguments: ``model_class`` (a class, class name, Auto class or
    task such as ``"text-classification"``), ``config``, config attributes as overrides
    (``num_labels=2``), ``ignore_mismatched_sizes``, ``attn_implementation``,
    ``trust_remote_code`` (remote code runs only when True), ``key_mapping``, ``torch_dtype``
    (old name of ``dtype``), ``offload_folder`` (of ``offload_dir``) and the hub's ``revision``,
    ``subfolder``, ``token``, ``cache_dir``, ``local_files_only``, ``force_download``. A model id
    not in the cache is downloaded (only the files the load reads); ``HF_HUB_OFFLINE=1`` reads
    the cache only. Arguments it cannot honour raise UnsupportedArgumentError saying why.

    A sentence-transformers folder returns the library's own object (``SentenceTransformer``,
    ``CrossEncoder``, ``SparseEncoder``... per its config, or ``model_class``); keyword arguments
    of that class (``prompts``, ``truncate_dim``, ``config_kwargs``...) are passed to it.

    ``world="auto"`` (or the number of ranks) spans the torch.distributed ranks: call it on
    every rank (torch.distributed is initialised from the environment if it is not yet). The
    ranks agree on versions, checkpoint and plan before any weight is read; each reads only
    its own stage's tensors; calls (the model, ``generate``) run on every rank in lockstep
    (bigload.distributed). ``max_memory`` is then ``"auto"``/None (each rank's free memory),
    one mapping for every rank, or one per rank; ``timeout`` (seconds) bounds every wait on
    another rank; ``context_tokens`` is the KV cache each stage keeps room for (default:
    min(4096, the model's positions)).
    """
    renamed, rest = translate_kwargs(kwargs)
    options = LoadOptions(
        device_map=device_map, max_memory=max_memory,
        dtype=pick("dtype", dtype, renamed.get("dtype")),
        offload_dir=pick("offload_dir", offload_dir, renamed.get("offload_dir")),
        missing=missing, progress=progress, prefetch=prefetch,
        no_split_module_classes=no_split_module_classes, offload_buffers=offload_buffers,
        headroom_bytes=headroom_bytes, ignore_mismatched_sizes=ignore_mismatched_sizes,
        attn_implementation=attn_implementation, key_mapping=key_mapping,
        trust_remote_code=trust_remote_code, world=world, timeout=timeout,
        context_tokens=context_tokens,
    )
    source = HubSource(revision, token, cache_dir, local_files_only, force_download)
    if world not in (None, 1):
        from ..distributed.load import across_ranks

        with across_ranks(options) as spanned:
            return _load(path_or_id, spanned, model_class, config, subfolder, rest, source)
    return _load(path_or_id, options, model_class, config, subfolder, rest, source)


def _load(path_or_id: str | os.PathLike, options: LoadOptions, model_class: Any, config: Any,
          subfolder: str, rest: dict[str, Any], source: HubSource) -> nn.Module:
    folder = resolve_model_path(path_or_id, subfolder=subfolder, source=source,
                                trust_remote_code=options.trust_remote_code,
                                progress=options.progress)
    if (folder / "modules.json").is_file():
        if not st.names_transformers_class(model_class):
            if options.ranks is not None:
                raise UnsupportedArgumentError(
                    f"'{folder}' is a sentence-transformers folder: across ranks, load its "
                    "transformer (model_class='AutoModel', or the folder modules.json names); "
                    "pooling then runs on the rank that holds the last hidden states.")
            if config is not None:
                raise UnsupportedArgumentError(
                    "config=... applies to a transformers folder; for the sentence-transformers "
                    f"folder '{folder}' pass config_kwargs={{...}} (config attribute overrides).")
            return st.load_sentence_transformers(folder, options, model_class=model_class,
                                                 init_kwargs=rest)
        folder = transformer_folder(folder)
    return load_transformers_model(folder, options, model_class=model_class, config=config,
                                   overrides=rest)


def accepted_arguments() -> list[str]:
    """The names :func:`load` takes (for error messages)."""
    return [n for n, p in inspect.signature(load).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]
