"""Executes a plan: every checkpoint tensor read once, cast on the way, straight to its placement;
missing tensors follow the policy; nothing left on ``meta``. Makes no decisions.

``load_weights`` fills a model from a checkpoint; ``place_weights`` places a model that is
already in memory. Both return the ``OffloadStore`` that dispatch pages from. Everything that can
fail (verify, the offload folder, initialisers) runs before the first tensor is placed, and a
failure while placing puts every tensor back as it was.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointIndex, CheckpointReader, open_reader
from .devices import DISK, Placement, cache_can_hold, parse_dtype, placement_str
from .errors import DeviceMapError, OffloadError, format_problems
from .journal import Journal
from .offload import OffloadItem, OffloadStore, StoredTensor, serve_from_folder
from .offload.stream import read_resident
from .pages import MADV_POPULATE_READ, advise
from .place import check_devices
from .plan import DevicePlan
from .preflight import (
    ModelTensor,
    Unexpected,
    VerifyReport,
    model_tensors,
    raise_for_problems,
    verify,
)
from .report import LoadReport, progress
from .sizes import tensor_nbytes
from .skeleton import rebuild_parameter
from .slots import TensorSlot, find_slot
from .tensors import (
    InitFn,
    Missing,
    check_policy,
    materialize_slots,
    meta_problems,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """How to load: the target float ``dtype`` (None keeps the model's), modules kept in fp32,
    the policies for missing and unexpected tensors, checkpoint key renames (regex →
    replacement), the folder for tensors converted for the disk tier, a progress bar (None: none,
    True: tqdm's, or a callable ``factory(total_bytes) -> bar`` with ``update(n)`` and
    ``close()``), and the initialiser ``missing="init"`` runs (default: each module's
    ``reset_parameters``)."""

    dtype: torch.dtype | str | None = None
    keep_in_fp32_modules: Sequence[str] | None = None
    missing: Missing = "error"
    unexpected: Unexpected = "warn"
    key_map: Mapping[str, str] | None = None
    offload_folder: str | os.PathLike | None = None
    progress: bool | Callable[[int], Any] | None = None
    init_fn: InitFn | None = None


@dataclass
class Loaded:
    """The result of a load: what happened (``report``) and the store of offloaded tensors that
    dispatch pages from (``store``)."""

    report: LoadReport
    store: OffloadStore = field(default_factory=OffloadStore)


@dataclass(frozen=True)
class Job:
    """One tensor to fill: from checkpoint ``key`` (None: missing) to ``placement`` as ``dtype``."""

    tensor: ModelTensor
    key: str | None
    placement: Placement
    dtype: torch.dtype
    kept: bool = False  # a real buffer the checkpoint lacks: it keeps its module's value

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.tensor.shape, self.dtype)


def load_weights(
    model: nn.Module,
    index: CheckpointIndex,
    plan: DevicePlan,
    options: LoadOptions = LoadOptions(),
    *,
    verified: VerifyReport | None = None,
) -> Loaded:
    """Fill ``model`` from ``index`` where ``plan`` says; return the report and the store.

    Everything is checked first (missing, unexpected, shapes, dtypes, plan coverage, offload
    folder, initialisers); on a problem one error lists all of them and the model is untouched.
    Disk-placed tensors become views of the checkpoint's own safetensors files when their dtype
    is the target dtype, otherwise of an offload folder written once. ``verified`` is the
    report of ``verify(model, index, plan=plan)`` when the caller already made it.
    """
    start = time.perf_counter()
    check_policy(options.missing)
    check_devices(plan)
    if options.unexpected not in ("error", "warn", "ignore"):
        raise ValueError(f"unexpected={options.unexpected!r}: use 'error', 'warn' or 'ignore'")
    dtype = parse_dtype(options.dtype, floating=True)
    report = _verified(model, index, plan, options, verified)
    tensors, nonpersistent = model_tensors(model)
    jobs = _jobs(tensors, report.key_for, plan, dtype, options.keep_in_fp32_modules,
                 set(report.kept))
    _preflight_missing(jobs, options)
    result = LoadReport(report.checkpoint, type(model).__name__, unexpected=list(report.unexpected),
                        tied=list(report.tied), prefix_change=report.prefix_change,
                        kept=list(report.kept))
    loaded = Loaded(result)
    convert = [j for j in jobs if j.key and j.placement == DISK and not _zero_copy_ok(j, index)]
    with open_reader(index) as reader, Journal() as journal:
        # before any tensor moves: the offload folder, then the missing tensors (an initialiser
        # that leaves one unset fails while the owner's other tensors are still meta)
        converted = _convert_for_disk(convert, reader, index, options, loaded)
        _initialize_missing(model, jobs, options, loaded, journal)
        with progress(options.progress, sum(j.nbytes for j in jobs if j.key)) as bar:
            _place_disk(jobs, converted, reader, loaded, journal, bar)
            _place_direct(jobs, reader, plan, loaded, journal, bar)
        _place_nonpersistent(nonpersistent, plan, journal)
    result.seconds = time.perf_counter() - start
    logger.info("%s", result)
    return loaded


def _verified(model: nn.Module, index: CheckpointIndex, plan: DevicePlan,
              options: LoadOptions, report: VerifyReport | None) -> VerifyReport:
    if report is None:
        report = verify(model, index, key_map=options.key_map, plan=plan)
    raise_for_problems(report, missing=options.missing, unexpected=options.unexpected,
                       n_ckpt_files=len(index.files))
    if report.tie_conflicts and untie_conflicts(model, index, report.tie_conflicts):
        report = verify(model, index, key_map=options.key_map, plan=plan)
    return report


def untie_conflicts(
    model: nn.Module, index: CheckpointIndex, conflicts: Sequence[Sequence[tuple[str, str]]]
) -> bool:
    """Members of a tie group stored with *different* values are untied (as transformers does,
    with a warning naming them) so that each keeps its checkpoint value; equal copies stay tied.
    Returns whether anything was untied."""
    untied = False
    with open_reader(index) as reader:
        for members in conflicts:
            (first_name, first_key), rest = members[0], members[1:]
            reference = reader.get(first_key)
            for name, key in rest:
                if key == first_key or torch.equal(reader.get(key), reference):
                    continue
                slot = find_slot(model, name)
                old = slot.tensor
                twin = torch.empty(old.shape, dtype=old.dtype, device="meta")
                table = slot.owner._parameters if slot.is_param else slot.owner._buffers
                table[slot.leaf] = rebuild_parameter(old, twin) if slot.is_param else twin
                logger.warning(
                    "%r is tied to %r in %s, but the checkpoint holds different values for them "
                    "(%r, %r): untied, each loads its own", name, first_name,
                    type(model).__name__, key, first_key)
                untied = True
    return untied


# --- jobs ---------------------------------------------------------------------------------------
def _jobs(
    tensors: list[ModelTensor],
    key_for: Mapping[str, str],
    plan: DevicePlan,
    dtype: torch.dtype | None,
    keep_fp32: Sequence[str] | None,
    kept: set[str],
) -> list[Job]:
    jobs, uncovered = [], []
    for tensor in tensors:
        if plan.unit_of(tensor.fqn) is None:
            uncovered.append(repr(tensor.fqn))
            continue
        if not plan.holds(tensor.fqn):  # another rank's: it stays on meta here, on purpose
            continue
        jobs.append(Job(tensor, key_for.get(tensor.fqn), plan.placement_of(tensor.fqn),
                        _target_dtype(tensor, dtype, keep_fp32), tensor.fqn in kept))
    if uncovered:
        raise DeviceMapError(
            f"the plan places no device for {len(uncovered)} tensor(s); was it made for "
            "another model?\n" + format_problems(uncovered)
            + "\nPlan this model with plan_devices() or plan_from_device_map()."
        )
    return jobs


def _target_dtype(
    tensor: ModelTensor, dtype: torch.dtype | None, keep_fp32: Sequence[str] | None
) -> torch.dtype:
    if not tensor.dtype.is_floating_point:
        return tensor.dtype
    if keep_fp32 and any(f".{m}." in f".{name}." for m in keep_fp32 for name in tensor.names):
        return torch.float32
    return dtype or tensor.dtype


def _preflight_missing(jobs: list[Job], options: LoadOptions) -> None:
    absent = [j.tensor.slot for j in jobs if j.key is None and j.tensor.is_meta]
    if absent and options.missing == "init":
        problem = meta_problems(absent, options.missing, options.init_fn, torch.device("cpu"))
        if problem is not None:
            raise problem


def _zero_copy_ok(job: Job, index: CheckpointIndex) -> bool:
    entry = index.entries[job.key]  # type: ignore[index]
    if entry.byte_range is None or entry.dtype != job.dtype:
        return False
    return entry.byte_range[0] % max(1, entry.dtype.itemsize) == 0


# --- the disk tier ------------------------------------------------------------------------------
def _convert_for_disk(
    convert: list[Job], reader: CheckpointReader, index: CheckpointIndex, options: LoadOptions,
    loaded: Loaded,
) -> dict[str, StoredTensor]:
    """Tensors that cannot be served from the checkpoint's files are served from the offload
    folder (converted now unless a pack there holds them). Returns their stored views by fqn."""
    if not convert:
        return {}
    if options.offload_folder is None:
        raise _needs_folder(convert, index)
    items = [OffloadItem(j.tensor.fqn, j.dtype, j.tensor.shape,
                         lambda j=j: reader.get(j.key), _source_files(index, j.key), j.key)
             for j in convert]
    served = serve_from_folder(options.offload_folder, items)
    loaded.store.readers.extend(served.readers)
    loaded.store.bytes_written += served.bytes_written
    loaded.report.bytes_written += served.bytes_written
    loaded.report.offload_folder = str(served.folder)
    return served.tensors


def _source_files(index: CheckpointIndex, key: str) -> tuple[Path, ...]:
    """The files a checkpoint tensor's values come from: its own, or every file of the
    checkpoint for a tensor built from others (transformers conversions)."""
    if key in getattr(index, "derived", {}):
        return tuple(index.files)
    return (index.entries[key].file,)


def _needs_folder(convert: list[Job], index: CheckpointIndex) -> OffloadError:
    names = [f"{j.tensor.fqn!r} ({_dt(j.dtype)}, checkpoint has "
             f"{_dt(index.entries[j.key].dtype)})" for j in convert]  # type: ignore[index]
    return OffloadError(
        f"{len(convert)} tensor(s) planned for disk must be converted before they can be "
        "served from disk (the checkpoint is not safetensors, its dtype differs, or the "
        "tensor is built from several checkpoint tensors):\n" + format_problems(names)
        + "\nPass offload_folder=... (offload_dir=... to bigload.load; converted once, "
        "reused by later loads)."
    )


def _place_disk(jobs, converted, reader, loaded, journal, bar) -> None:  # noqa: ANN001
    for job in jobs:
        if job.key is None or job.placement != DISK:
            continue
        item = converted.get(job.tensor.fqn)
        if item is None:  # zero-copy: a view of the checkpoint's own file
            entry = reader.index.entries[job.key]
            item = StoredTensor(job.tensor.fqn, reader.get(job.key).data, "disk",
                                reader.mmap_for(entry.file), entry.byte_range, file=entry.file,
                                identity=reader.index.identities.get(entry.file))
            loaded.report.zero_copy += 1
        loaded.store.add(item)
        journal.replace(job.tensor.slot, item.tensor)
        stored = reader.index.entries[job.key].dtype
        _account(loaded.report, job, DISK, stored=stored)
        bar.update(job.nbytes)


# --- devices and the CPU tier -------------------------------------------------------------------
def _place_direct(jobs, reader, plan, loaded, journal, bar) -> None:  # noqa: ANN001
    direct = [j for j in jobs if j.key is not None and j.placement != DISK]
    pin = plan.main.type != "cpu"
    tight = any(u.placement == DISK for u in plan.units)  # memory is tight: drop the cache
    cpu_tier = sum(j.nbytes for j in direct if j.placement.type == "cpu")
    views = not tight and not pin and cache_can_hold(cpu_tier)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bigload-load") as pool:
        for job, (new, stored_dtype, zero_copy) in zip(
            direct, pool.map(lambda j: _read_one(j, reader, pin, tight, views), direct)
        ):
            journal.replace(job.tensor.slot, new)
            if job.placement == torch.device("cpu") and pin:
                loaded.store.add(StoredTensor(job.tensor.fqn, new, "cpu"))
            _account(loaded.report, job, placement_str(job.placement), stored=stored_dtype)
            loaded.report.zero_copy += int(zero_copy)
            bar.update(job.nbytes)


def _read_one(
    job: Job, reader: CheckpointReader, pin: bool, tight: bool, views: bool
) -> tuple[torch.Tensor, torch.dtype, bool]:
    """Read, cast and place one tensor (runs in a worker thread; torch releases the GIL).

    A CPU-tier tensor stored in the dtype asked for is read into memory of its own where a disk
    tier streams (the page cache, which streaming churns, must not hold what the plan keeps
    resident; the cache the read used is dropped) or where memory is short. Where nothing is on
    disk and the CPU tier fits twice in what the process may still take (``views``), it is a
    view of the file with its pages mapped now: no copy, and the load returns with the weights
    in memory (1 GB, warm: 1.5x faster than a copy on the development VM; docs/design.md)."""
    entry = reader.index.entries[job.key]  # type: ignore[index]
    target = job.placement
    same = target.type == "cpu" and entry.dtype == job.dtype and entry.byte_range is not None
    if same and views:
        value = reader.get(job.key)  # type: ignore[arg-type]
        advise(reader.mmap_for(entry.file), entry.byte_range, MADV_POPULATE_READ,
               mmap.MADV_WILLNEED)
        return value, entry.dtype, True
    if same:
        identity = reader.index.identities.get(entry.file)
        return read_resident(entry, identity, pin=pin, drop=tight), entry.dtype, False
    value = reader.get(job.key)  # type: ignore[arg-type]
    if target.type == "cpu":
        new = value.to(job.dtype, copy=True)
        new = new.pin_memory() if pin else new
    else:
        new = value.to(target, dtype=job.dtype, non_blocking=False)
    mm = reader.mmap_for(entry.file) if entry.byte_range is not None else None
    advise(mm, entry.byte_range, mmap.MADV_DONTNEED)  # the source pages are not needed any more
    return new, value.dtype, False


def _account(result: LoadReport, job: Job, where: str, *, stored: torch.dtype) -> None:
    result.loaded.append(job.tensor.fqn)
    result.bytes_per_device[where] = result.bytes_per_device.get(where, 0) + job.nbytes
    if stored != job.dtype:
        result.cast[job.tensor.fqn] = f"{_dt(stored)}->{_dt(job.dtype)}"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- missing tensors and non-persistent buffers -------------------------------------------------
def _initialize_missing(model, jobs, options, loaded, journal) -> None:  # noqa: ANN001
    absent = [j for j in jobs if j.key is None]
    by_device: dict[str, list[Job]] = {}
    for job in absent:
        device = "cpu" if job.placement == DISK else placement_str(job.placement)
        by_device.setdefault(device, []).append(job)
    for device, group in by_device.items():
        metas = [j.tensor.slot for j in group if j.tensor.is_meta]
        journal.save(j.tensor.slot for j in group)
        if metas:
            materialize_slots(model, metas, torch.device(device), options.missing, None,
                              options.init_fn)
        for job in group:
            _settle_missing(job, device, options, loaded, journal)


def _settle_missing(job: Job, device: str, options: LoadOptions, loaded: Loaded,
                    journal: Journal) -> None:
    current = job.tensor.slot.tensor
    if current.device != torch.device(device) or current.dtype != job.dtype:
        journal.replace(job.tensor.slot, current.to(device, job.dtype))
    if job.placement == DISK:  # in memory, served by the store's CPU tier
        loaded.store.add(StoredTensor(job.tensor.fqn, job.tensor.slot.tensor, "cpu"))
    if job.kept:
        return
    loaded.report.initialized[job.tensor.fqn] = _how_initialized(job, options)
    where = placement_str(job.placement)
    loaded.report.bytes_per_device[where] = loaded.report.bytes_per_device.get(where, 0) + (
        job.nbytes)


def _how_initialized(job: Job, options: LoadOptions) -> str:
    if not job.tensor.is_meta:
        return "kept: the model's own value (the tensor was already real)"
    if options.missing == "zeros":
        return "zeros"
    if options.init_fn is not None:
        return f"init: {getattr(options.init_fn, '__qualname__', 'init_fn')}"
    return f"init: {type(job.tensor.slot.owner).__name__}.reset_parameters()"


def _place_nonpersistent(slots: list[TensorSlot], plan: DevicePlan, journal: Journal) -> None:
    """Non-persistent buffers run with their unit: on its device, else on the main device."""
    for slot in slots:
        device = plan.memory_device(slot.fqn)
        if slot.tensor.device.type != "meta" and slot.tensor.device != device:
            journal.replace(slot, slot.tensor.to(device))
