"""Executes a device map: every checkpoint tensor read once, cast on the way, straight to its
placement; missing tensors follow the policy; nothing left on ``meta``. Makes no decisions.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointIndex, CheckpointReader, open_reader, read_index
from .devicemap import DeviceMap, normalize_device_map, placement_of
from .devices import DISK, Placement, format_size, is_accelerator, parse_dtype, placement_str
from .errors import DeviceMapError, OffloadError, format_problems
from .offload import (
    STORE_ATTR,
    OffloadStore,
    StoredTensor,
    fingerprint,
    open_offload_folder,
    source_identity,
    write_offload_folder,
)
from .preflight import ModelTensor, Unexpected, model_tensors, raise_for_problems, verify
from .skeleton import rebuild_parameter
from .tensors import (
    InitFn,
    Missing,
    _check_policy,
    _materialize_slots,
    _meta_problems,
    find_slot,
    replace_tensor,
)

logger = logging.getLogger(__name__)



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
        n = 1
        for d in self.tensor.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class LoadReport:
    """What a load did: every tensor of the model is in exactly one of loaded / initialized /
    kept (tied aliases are listed under ``tied``)."""

    checkpoint: str
    model_class: str
    loaded: list[str] = field(default_factory=list)
    initialized: dict[str, str] = field(default_factory=dict)  # fqn -> how
    kept: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    tied: list[tuple[str, ...]] = field(default_factory=list)
    cast: dict[str, str] = field(default_factory=dict)  # fqn -> "bfloat16->float32"
    bytes_per_device: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    zero_copy: int = 0
    seconds: float = 0.0
    prefix_change: str | None = None
    offload_folder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["tied"] = [list(g) for g in self.tied]
        return out

    def __str__(self) -> str:
        devices = ", ".join(f"{d}: {format_size(b)}" for d, b in self.bytes_per_device.items())
        lines = [
            f"loaded {self.model_class} from {self.checkpoint!r} in {self.seconds:.2f} s",
            f"  tensors loaded: {len(self.loaded)} ({self.zero_copy} as zero-copy file views)",
            f"  tied groups: {len(self.tied)}",
            f"  initialised (not in the checkpoint): {len(self.initialized)}",
            f"  kept (real buffers not in the checkpoint): {len(self.kept)}",
            f"  unexpected (in the checkpoint, unused): {len(self.unexpected)}",
            f"  cast: {len(self.cast)}",
            f"  bytes per device: {devices or 'none'}",
            f"  bytes written to an offload folder: {format_size(self.bytes_written)}",
        ]
        if self.prefix_change:
            lines.append(f"  checkpoint keys {self.prefix_change}")
        if self.initialized:
            lines.append("  initialised tensors:\n" + format_problems(
                [f"{k!r}: {v}" for k, v in self.initialized.items()]))
        return "\n".join(lines)


def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: str | os.PathLike | CheckpointIndex,
    device_map: Any = None,
    *,
    dtype: torch.dtype | str | None = None,
    keep_in_fp32_modules: Sequence[str] | None = None,
    missing: Missing = "error",
    unexpected: Unexpected = "warn",
    key_map: Mapping[str, str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    progress: bool | None = None,
    init_fn: InitFn | None = None,
) -> LoadReport:
    """Load ``checkpoint`` into ``model`` following ``device_map`` and return a LoadReport.

    Everything is checked first (missing, unexpected, shapes, dtypes, device map coverage, offload
    folder); on a problem one error lists all of them and the model is untouched. Tensors placed
    on ``"disk"`` become views of the checkpoint's own safetensors files when their dtype is the
    target dtype, otherwise of an offload folder written once.
    """
    start = time.perf_counter()
    _check_policy(missing)
    if unexpected not in ("error", "warn", "ignore"):
        raise ValueError(f"unexpected={unexpected!r}: use 'error', 'warn' or 'ignore'")
    dtype = parse_dtype(dtype, floating=True)
    index = checkpoint if isinstance(checkpoint, CheckpointIndex) else read_index(checkpoint)
    dmap = normalize_device_map(device_map) if device_map is not None else None
    report = verify(model, index, key_map=key_map, device_map=dmap)
    raise_for_problems(
        report, missing=missing, unexpected=unexpected, n_ckpt_files=len(index.files)
    )
    if report.tie_conflicts and untie_conflicts(model, index, report.tie_conflicts):
        report = verify(model, index, key_map=key_map, device_map=dmap)
    tensors, nonpersistent = model_tensors(model)
    jobs = _jobs(tensors, report.key_for, dmap, dtype, keep_in_fp32_modules, set(report.kept))
    _preflight_missing(jobs, missing, init_fn)
    store = _existing_store(model)
    convert = [j for j in jobs if j.key and j.placement == DISK and not _zero_copy_ok(j, index)]
    folder = _offload_folder(convert, offload_folder, model, index)
    result = LoadReport(report.checkpoint, type(model).__name__, unexpected=list(report.unexpected),
                        tied=list(report.tied), prefix_change=report.prefix_change,
                        kept=list(report.kept))
    main_device = _main_device(dmap)
    # missing tensors first: an initialiser that leaves one unset fails before any checkpoint
    # tensor has moved (the owner's other tensors are still meta, so init leaves them alone)
    _initialize_missing(model, jobs, missing, init_fn, store, result)
    with open_reader(index) as reader, _progress(progress, jobs) as bar:
        _load_disk(jobs, convert, reader, store, folder, index, result, bar)
        _load_direct(jobs, reader, store, main_device, result, bar)
    _place_nonpersistent(nonpersistent, dmap, main_device)
    if store.items:
        object.__setattr__(model, STORE_ATTR, store)
    result.seconds = time.perf_counter() - start
    logger.info("%s", result)
    return result


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


def _jobs(
    tensors: list[ModelTensor],
    key_for: Mapping[str, str],
    dmap: DeviceMap | None,
    dtype: torch.dtype | None,
    keep_fp32: Sequence[str] | None,
    kept: set[str],
) -> list[Job]:
    jobs, uncovered = [], []
    for tensor in tensors:
        placement = _placement(tensor, dmap)
        if placement is None:
            uncovered.append(tensor.fqn)
            continue
        jobs.append(Job(tensor, key_for.get(tensor.fqn), placement,
                        _target_dtype(tensor, dtype, keep_fp32), tensor.fqn in kept))
    if uncovered:
        raise DeviceMapError(
            f"the device map places no device for {len(uncovered)} tensor(s):\n"
            + format_problems([repr(n) for n in uncovered])
            + "\nAdd their modules (or '') to the map, or use device_map='auto'."
        )
    return jobs


def _placement(tensor: ModelTensor, dmap: DeviceMap | None) -> Placement | None:
    if dmap is None:
        device = tensor.slot.tensor.device
        return torch.device("cpu") if device.type == "meta" else device
    found = [placement_of(dmap, name) for name in tensor.names]
    placed = [p for p in found if p is not None]
    if len({placement_str(p) for p in placed}) > 1:
        logger.warning("tied tensors %s are mapped to %s; all go to %s (a tie is one tensor)",
                       tensor.names, [placement_str(p) for p in placed], placement_str(placed[0]))
    return placed[0] if placed else None


def _target_dtype(
    tensor: ModelTensor, dtype: torch.dtype | None, keep_fp32: Sequence[str] | None
) -> torch.dtype:
    if not tensor.dtype.is_floating_point:
        return tensor.dtype
    if keep_fp32 and any(f".{m}." in f".{name}." for m in keep_fp32 for name in tensor.names):
        return torch.float32
    return dtype or tensor.dtype


def _preflight_missing(jobs: list[Job], missing: Missing, init_fn: InitFn | None) -> None:
    absent = [j.tensor.slot for j in jobs if j.key is None and j.tensor.is_meta]
    if absent and missing == "init":
        problem = _meta_problems(absent, missing, init_fn, torch.device("cpu"))
        if problem is not None:
            raise problem


def _existing_store(model: nn.Module) -> OffloadStore:
    store = getattr(model, STORE_ATTR, None)
    return store if isinstance(store, OffloadStore) else OffloadStore()


def _main_device(dmap: DeviceMap | None) -> torch.device:
    for placement in (dmap or {}).values():
        if is_accelerator(placement):
            return placement  # type: ignore[return-value]
    return torch.device("cpu")


def _zero_copy_ok(job: Job, index: CheckpointIndex) -> bool:
    entry = index.entries[job.key]  # type: ignore[index]
    if entry.byte_range is None or entry.dtype != job.dtype:
        return False
    return entry.byte_range[0] % max(1, torch.empty((), dtype=entry.dtype).element_size()) == 0


def _offload_folder(
    convert: list[Job], folder: str | os.PathLike | None, model: nn.Module, index: CheckpointIndex
) -> OffloadTarget | None:
    if not convert:
        return None
    if folder is None:
        names = [f"{j.tensor.fqn!r} ({_dt(j.dtype)}, checkpoint has "
                 f"{_dt(index.entries[j.key].dtype)})" for j in convert]  # type: ignore[index]
        raise OffloadError(
            f"{len(convert)} tensor(s) planned for disk must be converted before they can be "
            "served from disk (the checkpoint is not safetensors, its dtype differs, or the "
            "tensor is built from several checkpoint tensors):\n"
            + format_problems(names)
            + "\nPass offload_folder=... (offload_dir=... to bigload.load; written once, "
            "fingerprinted, reused by later loads)."
        )
    specs = [(j.tensor.fqn, j.dtype, j.tensor.shape) for j in convert]
    value = fingerprint(type(model).__name__, specs, source_identity(index.files))
    path = Path(folder).resolve()
    # checked now, before any tensor moves: a folder of other weights is refused up front
    return OffloadTarget(path, value, open_offload_folder(path, value))


@dataclass(frozen=True)
class OffloadTarget:
    """The offload folder a load converts into: its fingerprint, and its reader if it already
    holds exactly these tensors."""

    path: Path
    fingerprint: str
    existing: CheckpointReader | None


def _load_disk(jobs, convert, reader, store, folder, index, result, bar) -> None:  # noqa: ANN001
    converting = {id(j) for j in convert}
    for job in jobs:
        if job.key is None or job.placement != DISK or id(job) in converting:
            continue
        entry = index.entries[job.key]
        view = reader.get(job.key).data
        store.add(StoredTensor(job.tensor.fqn, view, "disk", reader.mmap_for(entry.file),
                               entry.byte_range))
        replace_tensor(job.tensor.slot, view)
        _account(result, job, "disk", cast=False)
        result.zero_copy += 1
        bar.update(job.nbytes)
    if convert and folder is not None:
        _load_converted(convert, reader, store, folder, result, bar)


def _load_converted(convert, reader, store, folder, result, bar) -> None:  # noqa: ANN001
    path, value = folder.path, folder.fingerprint
    by_name = {j.tensor.fqn: j for j in convert}
    offload_reader = folder.existing
    if offload_reader is None:
        offload_reader, written = write_offload_folder(
            path, [(n, j.dtype, j.tensor.shape) for n, j in by_name.items()],
            lambda name: reader.get(by_name[name].key).to(by_name[name].dtype), value)
        result.bytes_written += written
    else:
        logger.info("reusing offload folder %s (fingerprint matches)", path)
    store.readers.append(offload_reader)
    result.offload_folder = str(path)
    for name, job in by_name.items():
        entry = offload_reader.index.entries[name]
        view = offload_reader.get(name).data
        store.add(StoredTensor(name, view, "disk", offload_reader.mmap_for(entry.file),
                               entry.byte_range))
        replace_tensor(job.tensor.slot, view)
        _account(result, job, "disk", cast=True, stored=reader.index.entries[job.key].dtype)
        bar.update(job.nbytes)


def _load_direct(jobs, reader, store, main_device, result, bar) -> None:  # noqa: ANN001
    direct = [j for j in jobs if j.key is not None and j.placement != DISK]
    pin = main_device.type != "cpu"
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bigload-load") as pool:
        for job, (new, stored_dtype, zero_copy) in zip(
            direct, pool.map(lambda j: _read_one(j, reader, pin), direct)
        ):
            replace_tensor(job.tensor.slot, new)
            where = placement_str(job.placement)
            if job.placement == torch.device("cpu") and pin:
                store.add(StoredTensor(job.tensor.fqn, new, "cpu"))
            _account(result, job, where, cast=stored_dtype != job.dtype, stored=stored_dtype)
            result.zero_copy += int(zero_copy)
            bar.update(job.nbytes)


def _read_one(
    job: Job, reader: CheckpointReader, pin: bool
) -> tuple[torch.Tensor, torch.dtype, bool]:
    """Read, cast and place one tensor (runs in a worker thread; torch releases the GIL)."""
    value = reader.get(job.key)  # type: ignore[arg-type]
    stored = value.dtype
    entry = reader.index.entries[job.key]  # type: ignore[index]
    target = job.placement
    if target.type == "cpu" and stored == job.dtype and not pin and entry.byte_range is not None:
        view = value.data
        _advise(reader, entry, mmap.MADV_WILLNEED)  # starts cold reads; maps nothing yet
        return view, stored, True
    if target.type == "cpu":
        new = value.to(job.dtype, copy=True)
        new = new.pin_memory() if pin else new
    else:
        new = value.to(target, dtype=job.dtype, non_blocking=False)
    _advise(reader, entry, mmap.MADV_DONTNEED)  # the source pages are not needed any more
    return new, stored, False


def _advise(reader: CheckpointReader, entry: Any, *advice: int) -> None:
    if entry.byte_range is None:
        return
    start, end = entry.byte_range
    first = (start // mmap.PAGESIZE) * mmap.PAGESIZE
    if end <= start:
        return
    mm = reader.mmap_for(entry.file)
    for a in advice:
        try:
            mm.madvise(a, first, end - first)
            return
        except OSError:
            continue


def _account(result: LoadReport, job: Job, where: str, *, cast: bool,
             stored: torch.dtype | None = None) -> None:
    result.loaded.append(job.tensor.fqn)
    result.bytes_per_device[where] = result.bytes_per_device.get(where, 0) + job.nbytes
    if cast and stored is not None and stored != job.dtype:
        result.cast[job.tensor.fqn] = f"{_dt(stored)}->{_dt(job.dtype)}"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _initialize_missing(model, jobs, missing, init_fn, store, result) -> None:  # noqa: ANN001
    absent = [j for j in jobs if j.key is None]
    if not absent:
        return
    by_device: dict[str, list[Job]] = {}
    for job in absent:
        device = "cpu" if job.placement == DISK else placement_str(job.placement)
        by_device.setdefault(device, []).append(job)
    for device, group in by_device.items():
        metas = [j.tensor.slot for j in group if j.tensor.is_meta]
        if metas:
            _materialize_slots(model, metas, torch.device(device), missing, None, init_fn)
        for job in group:
            current = job.tensor.slot.tensor
            if current.device != torch.device(device) or current.dtype != job.dtype:
                replace_tensor(job.tensor.slot, current.to(device, job.dtype))
            if job.placement == DISK:  # in memory, served by the store's CPU tier
                store.add(StoredTensor(job.tensor.fqn, job.tensor.slot.tensor, "cpu"))
            if job.kept:
                continue
            how = _how_initialized(job, missing, init_fn)
            result.initialized[job.tensor.fqn] = how
            where = placement_str(job.placement)
            result.bytes_per_device[where] = result.bytes_per_device.get(where, 0) + job.nbytes


def _how_initialized(job: Job, missing: Missing, init_fn: InitFn | None) -> str:
    if not job.tensor.is_meta:
        return "kept: the model's own value (the tensor was already real)"
    if missing == "zeros":
        return "zeros"
    if init_fn is not None:
        return f"init: {getattr(init_fn, '__qualname__', 'init_fn')}"
    return f"init: {type(job.tensor.slot.owner).__name__}.reset_parameters()"


def _place_nonpersistent(slots, dmap, main_device) -> None:  # noqa: ANN001
    for slot in slots:
        placement = placement_of(dmap, slot.fqn) if dmap else slot.tensor.device
        device = main_device if placement in (None, DISK) else placement
        if device.type != "meta" and slot.tensor.device != device:
            replace_tensor(slot, slot.tensor.to(device))


class _NoBar:
    def update(self, n: int) -> None:
        pass


class _progress:  # noqa: N801 - a context manager used like a function
    def __init__(self, enabled: bool | None, jobs: list[Job]):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total = sum(j.nbytes for j in jobs)
        self.bar: Any = _NoBar()

    def __enter__(self) -> Any:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="loading", leave=False)
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.close()


AUTO_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike | CheckpointIndex,
    device_map: Any = None,
    max_memory: Mapping[Any, int | str] | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    offload_buffers: bool = False,
    dtype: torch.dtype | str | None = None,
    offload_state_dict: bool | None = None,
    skip_keys: str | Sequence[str] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    force_hooks: bool = False,
    strict: bool = False,
    *,
    keep_in_fp32_modules: Sequence[str] | None = None,
    missing: Missing | None = None,
    unexpected: Unexpected | None = None,
    key_map: Mapping[str, str] | None = None,
    progress: bool | None = None,
    init_fn: InitFn | None = None,
    prefetch: int | None = None,
) -> nn.Module:
    """Plan (for ``device_map="auto"|"balanced"|"balanced_low_0"|"sequential"``), load and
    dispatch, with accelerate's argument names. Returns ``model``; its ``bigload_plan`` and
    ``bigload_report`` attributes hold the plan and the LoadReport.

    ``strict=True`` is ``missing="error", unexpected="error"``; otherwise missing tensors raise
    (``missing="error"``) unless a policy is given, and unexpected ones are logged.
    """
    from .dispatch import dispatch_model, prefetch_depth
    from .plan import plan_devices

    del offload_state_dict  # accelerate's memory saver; bigload streams tensor by tensor anyway
    index = checkpoint if isinstance(checkpoint, CheckpointIndex) else read_index(checkpoint)
    plan = None
    if isinstance(device_map, str) and device_map in AUTO_STRATEGIES:
        plan = plan_devices(model, max_memory=max_memory, strategy=device_map,  # type: ignore[arg-type]
                            no_split_module_classes=no_split_module_classes, dtype=dtype,
                            offload_buffers=offload_buffers,
                            keep_in_fp32_modules=keep_in_fp32_modules,
                            prefetch=prefetch_depth(prefetch))
        device_map = plan.device_map
    report = load_checkpoint_in_model(
        model, index, device_map, dtype=dtype, keep_in_fp32_modules=keep_in_fp32_modules,
        missing=missing or "error", unexpected=unexpected or ("error" if strict else "warn"),
        key_map=key_map, offload_folder=offload_folder, progress=progress, init_fn=init_fn,
    )
    if device_map is not None:
        dispatch_model(model, plan or device_map, offload_dir=offload_folder,
                       offload_buffers=offload_buffers, skip_keys=skip_keys,
                       preload_module_classes=preload_module_classes, prefetch=prefetch,
                       force_hooks=force_hooks)
    object.__setattr__(model, "bigload_plan", plan)
    object.__setattr__(model, "bigload_report", report)
    return model
