"""One call for transformers and sentence-transformers checkpoints: resolve the folder (a local
one, or a model id fetched from the Hugging Face Hub), build the skeleton from its config
(transformers' declarations honoured), plan, load, dispatch. transformers is an optional extra.

:func:`load` takes ``from_pretrained``'s arguments (``hf_args`` translates them once). A
sentence-transformers folder (``modules.json``) loads as the library's own object
(``SentenceTransformer``, ``CrossEncoder``, ...), its transformers models loaded by bigload
(``sentence_transformers_compat``).
"""

from __future__ import annotations

import atexit
import copy
import inspect
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import count
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointIndex, read_index
from .devices import format_size, parse_dtype
from .errors import (
    CheckpointMismatchError,
    ModelResolveError,
    RemoteCodeError,
    UnsupportedArgumentError,
    format_problems,
)
from .hf_args import model_class_from, pick, refuse_unknown, remote_auto_class, translate_kwargs
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
    ``model.bigload_report``.

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
    if world not in (None, 1):
        from .distributed.load import across_ranks

        with across_ranks(options) as spanned:
            return _load(path_or_id, spanned, model_class, config, subfolder, rest, HubSource(
                revision, token, cache_dir, local_files_only, force_download))
    return _load(path_or_id, options, model_class, config, subfolder, rest,
                 HubSource(revision, token, cache_dir, local_files_only, force_download))


def _load(path_or_id: str | os.PathLike, options: LoadOptions, model_class: Any, config: Any,
          subfolder: str, rest: dict[str, Any], source: HubSource) -> nn.Module:
    folder = resolve_model_path(path_or_id, subfolder=subfolder, source=source,
                                trust_remote_code=options.trust_remote_code,
                                progress=options.progress)
    if (folder / "modules.json").is_file():
        from . import sentence_transformers_compat as st

        if not st.names_transformers_class(model_class):
            if options.ranks is not None:
                raise UnsupportedArgumentError(
                    f"'{folder}' is a sentence-transformers folder: across ranks, load its "
                    f"transformer (model_class='AutoModel', or the folder modules.json names); "
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


def resolve_model_path(
    path_or_id: str | os.PathLike,
    *,
    subfolder: str = "",
    source: HubSource | None = None,
    trust_remote_code: bool | None = None,
    progress: bool | None = None,
) -> Path:
    """A local folder with config.json (or modules.json), or the local snapshot of a Hub model
    id, fetched if missing (:mod:`bigload.hub`; only from the cache with ``local_files_only`` or
    ``HF_HUB_OFFLINE=1``). ``subfolder`` is a folder inside either."""
    source = source or HubSource()
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        _check_local_revision(path, source.revision)
        return _model_folder(path / subfolder)
    if path.exists():
        raise ModelResolveError(f"'{path.resolve()}' is a file; pass the model's folder")
    from .hub import fetch_model

    snapshot = fetch_model(str(path_or_id), subfolder=subfolder, revision=source.revision,
                           token=source.token, cache_dir=source.cache_dir,
                           local_files_only=source.local_files_only,
                           force_download=source.force_download,
                           trust_remote_code=bool(trust_remote_code), progress=progress)
    return _model_folder(snapshot / subfolder)


def _model_folder(path: Path) -> Path:
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise ModelResolveError(
            f"'{path.resolve()}' has no config.json: bigload.load needs a transformers model "
            "folder (config.json + weights). For a bare checkpoint use "
            "bigload.load_checkpoint_and_dispatch(model, path, ...)."
        )
    return path.resolve()


def _check_local_revision(path: Path, revision: str | None) -> None:
    if revision not in (None, "main"):
        raise UnsupportedArgumentError(
            f"revision={revision!r} names a version on the Hugging Face Hub, but '{path.resolve()}'"
            " is a local folder, which has one version. Pass the model id ('org/name') to load "
            "that revision, or drop revision=.")


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
    transformers = _transformers()
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


def load_transformers_model(
    folder: Path,
    options: LoadOptions | None = None,
    *,
    model_class: Any = None,
    config: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A transformers model folder, loaded by ``options``: the config (``config``, else the
    folder's; ``overrides`` set on it), the class (:func:`model_class_for`), then
    :func:`load_pretrained`."""
    options = options or LoadOptions()
    config = model_config(folder, config, overrides, options.trust_remote_code)
    cls = model_class_for(config, model_class, options.trust_remote_code)
    return load_pretrained(cls, folder, config, options)


def model_config(folder: Path, given: Any = None, overrides: Mapping[str, Any] | None = None,
                 trust_remote_code: bool | None = None) -> Any:
    """``given`` (a config, or a path to one) or the folder's config, with ``overrides`` set
    (as ``from_pretrained`` does with config attributes passed as keywords)."""
    if given is None or isinstance(given, (str, os.PathLike)):
        config = _auto_config(Path(given) if given is not None else folder, trust_remote_code)
    else:
        config = copy.deepcopy(given)
    unknown = [name for name in overrides or {} if not hasattr(config, name)]
    refuse_unknown(unknown, accepted_arguments(), f"attributes of {type(config).__name__}")
    for name, value in (overrides or {}).items():
        setattr(config, name, value)
    return config


def _auto_config(folder: Path, trust_remote_code: bool | None) -> Any:
    try:
        return _transformers().AutoConfig.from_pretrained(
            folder, trust_remote_code=bool(trust_remote_code))
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        auto_map = read_json(folder / "config.json").get("auto_map")
        raise _remote_code_error(str(folder), auto_map) from err


def load_pretrained(cls: Any, folder: Path, config: Any, options: LoadOptions) -> nn.Module:
    """Build ``cls`` from ``config`` on meta and load ``folder``'s checkpoint into it by
    ``options``: planned, loaded, dispatched, reported. ``from_pretrained``, as bigload does it."""
    index = read_index(folder)
    dtype = model_dtype(config, index, options.dtype)
    extra: dict[str, Any] = {}
    if options.attn_implementation is not None:
        extra["attn_implementation"] = options.attn_implementation
    if options.trust_remote_code:
        extra["trust_remote_code"] = True
    model = build_skeleton(config, cls, dtype, **extra)
    _load_checkpoint(model, index, dtype, options)
    _load_generation_config(model, folder, _transformers())
    model.eval()
    return model


def _load_checkpoint(model: nn.Module, index: CheckpointIndex, dtype: torch.dtype,
                     options: LoadOptions) -> None:
    """The stages, composed: plan → verify → load → dispatch."""
    from .loader import LoadOptions as WeightOptions
    from .loader import load_weights
    from .preflight import verify
    from .runtime import dispatch

    key_map = {**(checkpoint_key_map(model) or {}), **(options.key_mapping or {})}
    fingerprinted = index  # as stored (the ranks compare it), before transformers' conversions
    index, key_map = prepare_checkpoint(model, index, key_map or None)
    mismatched: tuple = ()
    missing = options.missing or "init"
    if options.ignore_mismatched_sizes:
        index, mismatched, others_missing = _without_mismatched(model, index, key_map)
        if mismatched and missing == "error" and not others_missing:
            missing = "init"  # what ignore_mismatched_sizes asks for the mismatched tensors
    if options.ranks is not None:  # every rank plans the stages; they agree before reading
        from .distributed.load import plan_stage

        plan = plan_stage(options.ranks, model, index, dtype, options, stored=fingerprinted)
    else:
        plan = _plan(model, dtype, options, index)
    offload_dir, temporary = _offload_dir(options.offload_dir)
    if options.ranks is not None and not temporary:
        offload_dir = Path(offload_dir) / f"rank{options.ranks.rank}"
    weights = WeightOptions(
        dtype=dtype, keep_in_fp32_modules=_keep_in_fp32(model, dtype), missing=missing,  # type: ignore[arg-type]
        key_map=key_map, offload_folder=offload_dir, progress=options.progress,
        init_fn=init_fn_for(model))
    with _explained_mismatch(options):
        report = verify(model, index, key_map=key_map, plan=plan)
        loaded = load_weights(model, index, plan, weights, verified=report)
    dispatch(model, plan, loaded.store)
    if options.ranks is not None:  # calls run in lockstep with the other ranks
        from .distributed.load import join_lockstep

        join_lockstep(options.ranks, model, plan)
    object.__setattr__(model, "bigload_report", loaded.report)
    _warn_initialised(loaded.report, mismatched)
    if temporary and loaded.report.offload_folder:
        _say_temporary_offload(loaded.report, index, dtype)


def _plan(model: nn.Module, dtype: torch.dtype, options: LoadOptions,
          index: CheckpointIndex) -> Any:
    """The DevicePlan: planned for a strategy name (with the headroom and buffer choices), or
    the map (one device, a dict) given by hand."""
    from .plan import STRATEGIES, DevicePlan, plan_from_device_map

    given = options.device_map
    if isinstance(given, DevicePlan):
        return given
    if isinstance(given, str) and given in STRATEGIES:
        return plan_model(model, dtype=dtype, max_memory=options.max_memory, strategy=given,
                          no_split_module_classes=options.no_split_module_classes,
                          prefetch=options.prefetch, offload_buffers=options.offload_buffers,
                          headroom_bytes=options.headroom_bytes, index=index)
    return plan_from_device_map(
        model, given, prefetch=options.prefetch, dtype=dtype,
        no_split_module_classes=_no_split(model, options.no_split_module_classes),
        offload_buffers=options.offload_buffers)


def _without_mismatched(
    model: nn.Module, index: CheckpointIndex, key_map: Mapping[str, str] | None
) -> tuple[CheckpointIndex, tuple, tuple[str, ...]]:
    """``ignore_mismatched_sizes``: the index without the tensors whose shape differs from the
    model's (they become missing, hence initialised), those mismatches, and what else is
    missing."""
    from .preflight import verify

    report = verify(model, index, key_map=key_map)
    drop = {report.key_for[name] for name, _, _ in report.shape_mismatches}
    if not drop:
        return index, (), report.missing
    entries = {k: e for k, e in index.entries.items() if k not in drop}
    smaller = replace(index, entries=MappingProxyType(entries),
                      total_bytes=sum(e.nbytes for e in entries.values()))
    return smaller, report.shape_mismatches, report.missing


@contextmanager
def _explained_mismatch(options: LoadOptions) -> Iterator[None]:
    """A shape mismatch refused by the loader also names transformers' way out."""
    try:
        yield
    except CheckpointMismatchError as err:
        if options.ignore_mismatched_sizes or " in the model, " not in str(err):
            raise
        raise type(err)(
            f"{err}\nTo initialise the tensors whose shape differs instead (a new head, as "
            "from_pretrained does), pass ignore_mismatched_sizes=True.", err.problems) from err


def _warn_initialised(report: Any, mismatched: Sequence[tuple]) -> None:
    """transformers' load report, as warnings: what was initialised rather than loaded."""
    if mismatched:
        lines = [f"{name!r}: checkpoint {tuple(ckpt)}, model {tuple(shape)}"
                 for name, shape, ckpt in mismatched]
        logger.warning(
            "%s: %d tensor(s) have another shape in the checkpoint %s and were initialised "
            "instead (ignore_mismatched_sizes=True); train them before use:\n%s",
            report.model_class, len(lines), report.checkpoint, format_problems(lines))
    names = {name for name, *_ in mismatched}
    fresh = [f"{name!r}: {how}" for name, how in report.initialized.items()
             if name not in names and not how.startswith("kept")]
    if fresh:
        logger.warning(
            "%s: %d tensor(s) are not in the checkpoint %s and were initialised (listed in "
            "model.bigload_report); train them before use, or pass missing='error' to refuse:"
            "\n%s", report.model_class, len(fresh), report.checkpoint, format_problems(fresh))


def _offload_dir(given: str | os.PathLike | None) -> tuple[str | os.PathLike, bool]:
    """``(folder, temporary)``: the given offload folder, else a fresh one in a temporary
    directory removed at exit (written only if a disk tensor must be converted)."""
    if given is not None:
        return given, False
    return _temporary_root() / f"offload-{next(_OFFLOADS)}", True


_OFFLOADS = count()


@lru_cache(maxsize=1)
def _temporary_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="bigload-offload-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def _say_temporary_offload(report: Any, index: CheckpointIndex, dtype: torch.dtype) -> None:
    logger.warning(
        "%s: %s of tensors planned for disk were converted into %s, a temporary offload folder "
        "removed at exit, because %s. Pass offload_dir=... to keep them for the next load.",
        report.model_class, format_size(report.bytes_written), report.offload_folder,
        _conversion_reason(index, dtype))


def _conversion_reason(index: CheckpointIndex, dtype: torch.dtype) -> str:
    if index.format == "torch":
        return "the checkpoint is torch .bin (pickles cannot be served from disk as stored)"
    stored = {e.dtype for e in index.entries.values() if e.dtype.is_floating_point}
    if stored and stored != {dtype}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in stored))
        return (f"the checkpoint stores {names} and the model loads as "
                f"{str(dtype).removeprefix('torch.')}")
    return "some tensors are built from several checkpoint tensors (transformers conversions)"


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
def transformer_folder(folder: Path) -> Path:
    """The folder holding the transformers model: ``folder``, or for a sentence-transformers
    folder (``modules.json``) the first module folder whose config.json is a transformers
    config (has a ``model_type``), whatever the module's type is called."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return folder
    for module in read_json(modules):
        candidate = folder / module.get("path", "")
        config = candidate / "config.json"
        if config.is_file() and "model_type" in read_json(config):
            return candidate
    raise ModelResolveError(
        f"'{modules}' names no module holding a transformers model (a folder whose "
        "config.json has a model_type); load it with bigload.load, which lets "
        "sentence-transformers assemble it.")


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
    from .plan import plan_devices

    no_split = _no_split(model, no_split_module_classes)
    extra = stage_extra_bytes(model, dtype, context_tokens) if world > 1 else None
    return plan_devices(
        model, max_memory=max_memory, strategy=strategy,  # type: ignore[arg-type]
        no_split_module_classes=no_split, dtype=dtype, offload_buffers=offload_buffers,
        headroom_bytes=headroom_bytes, keep_in_fp32_modules=_keep_in_fp32(model, dtype),
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
    from .preflight import verify

    index, key_map = prepare_checkpoint(model, index, checkpoint_key_map(model))
    return verify(model, index, key_map=key_map)
