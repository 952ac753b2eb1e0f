"""A transformers model folder loaded by bigload: the stages composed (plan → verify → load →
dispatch), with ``from_pretrained``'s behaviours: ``ignore_mismatched_sizes``, a temporary
offload folder when one is needed and none was given, the generation config, warnings that
name what was initialised."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import lru_cache
from itertools import count
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointIndex, read_index
from ..devices import format_size
from ..errors import (
    CheckpointMismatchError,
    format_problems,
)
from ..hf_conversions import prepare_checkpoint
from ..loader import LoadOptions as WeightOptions
from ..loader import load_weights
from ..plan import STRATEGIES, DevicePlan, plan_from_device_map
from ..preflight import verify
from ..runtime import dispatch
from .build import (
    build_skeleton,
    checkpoint_key_map,
    init_fn_for,
    keep_in_fp32_for,
    model_class_for,
    model_config,
    model_dtype,
    no_split_classes,
    plan_model,
)
from .options import LoadOptions, transformers_module

logger = logging.getLogger(__name__)


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
    _load_generation_config(model, folder, transformers_module())
    model.eval()
    return model


def _load_checkpoint(model: nn.Module, index: CheckpointIndex, dtype: torch.dtype,
                     options: LoadOptions) -> None:
    """The stages, composed: plan → verify → load → dispatch."""
    key_map = {**(checkpoint_key_map(model) or {}), **(options.key_mapping or {})}
    stored = index  # as stored (the ranks compare it), before transformers' conversions
    index, key_map = prepare_checkpoint(model, index, key_map or None)
    mismatched: tuple = ()
    missing = options.missing or "init"
    if options.ignore_mismatched_sizes:
        index, mismatched, others_missing = _without_mismatched(model, index, key_map)
        if mismatched and missing == "error" and not others_missing:
            missing = "init"  # what ignore_mismatched_sizes asks for the mismatched tensors
    if options.ranks is not None:  # every rank plans the stages; they agree before reading
        from ..distributed.load import plan_stage

        plan = plan_stage(options.ranks, stored, options.device_map, options.max_memory,
                          lambda budgets: plan_model(
                              model, dtype=dtype, max_memory=budgets, strategy=options.device_map,
                              no_split_module_classes=options.no_split_module_classes,
                              prefetch=options.prefetch, offload_buffers=options.offload_buffers,
                              headroom_bytes=options.headroom_bytes, index=index,
                              world=options.ranks.world_size,
                              context_tokens=options.context_tokens))
    else:
        plan = _plan(model, dtype, options, index)
    offload_dir, temporary = _offload_dir(options.offload_dir)
    if options.ranks is not None and not temporary:
        offload_dir = Path(offload_dir) / f"rank{options.ranks.rank}"
    weights = WeightOptions(
        dtype=dtype, keep_in_fp32_modules=keep_in_fp32_for(model, dtype), missing=missing,  # type: ignore[arg-type]
        key_map=key_map, offload_folder=offload_dir, progress=options.progress,
        init_fn=init_fn_for(model))
    with _explained_mismatch(options):
        report = verify(model, index, key_map=key_map, plan=plan)
        loaded = load_weights(model, index, plan, weights, verified=report)
    dispatch(model, plan, loaded.store)
    if options.ranks is not None:  # calls run in lockstep with the other ranks
        from ..distributed.load import join_lockstep

        join_lockstep(options.ranks, model, plan)
    object.__setattr__(model, "bigload_report", loaded.report)
    _warn_initialised(loaded.report, mismatched)
    if temporary and loaded.report.offload_folder:
        _say_temporary_offload(loaded.report, index, dtype)


def _plan(model: nn.Module, dtype: torch.dtype, options: LoadOptions,
          index: CheckpointIndex) -> Any:
    """The DevicePlan: planned for a strategy name (with the headroom and buffer choices), or
    the map (one device, a dict) given by hand."""

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
        no_split_module_classes=no_split_classes(model, options.no_split_module_classes),
        offload_buffers=options.offload_buffers)


def _without_mismatched(
    model: nn.Module, index: CheckpointIndex, key_map: Mapping[str, str] | None
) -> tuple[CheckpointIndex, tuple, tuple[str, ...]]:
    """``ignore_mismatched_sizes``: the index without the tensors whose shape differs from the
    model's (they become missing, hence initialised), those mismatches, and what else is
    missing."""

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


def _load_generation_config(model: nn.Module, folder: Path, transformers: Any) -> None:
    if not (folder / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    try:
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        logger.warning("ignoring generation_config.json in %s: %s", folder, err)
