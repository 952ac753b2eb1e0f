"""A model already in memory placed where a plan says (``place_weights``): tensors moved to their
devices, disk-placed ones written once to an offload folder and served from it; and the check
that nothing is left on meta (``refuse_meta``), which dispatch runs too."""

from __future__ import annotations

import os

from torch import nn

from .devices import DISK, parse_device, placement_str
from .errors import DeviceError, MetaTensorError, OffloadError, format_problems
from .journal import Journal
from .offload import OffloadItem, OffloadStore, serve_from_folder
from .plan import DevicePlan, check_covers
from .slots import unique_slots
from .tensors import meta_problems


def place_weights(
    model: nn.Module,
    plan: DevicePlan,
    *,
    store: OffloadStore | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> OffloadStore:
    """Place a model whose tensors are in memory (or in ``store``) where ``plan`` says: moved to
    their devices, disk-placed ones written once to ``offload_folder`` and served from it.
    Meta tensors not served by ``store`` are an error listing all of them, before anything
    moves. Returns the store dispatch pages from."""
    store = store if store is not None else OffloadStore()
    check_devices(plan)
    check_covers(model, {u.name: u for u in plan.units})
    refuse_meta(model, plan, store)
    slots = unique_slots(model)
    with Journal() as journal:
        _offload_in_memory(model, slots, plan, store, offload_folder, journal)
        for slot in slots:
            device = plan.memory_device(slot.fqn)
            if slot.fqn not in store.items and slot.tensor.device != device:
                journal.replace(slot, slot.tensor.to(device))
    return store


def check_devices(plan: DevicePlan) -> None:
    """The accelerators ``plan`` places units on exist on this machine (a plan may be made for
    another one, but only run where its devices are)."""
    wanted = {u.placement for u in plan.units} | {plan.main_device}
    for placement in sorted(wanted - {"cpu", DISK}):
        try:
            parse_device(placement, check_available=True)
        except DeviceError as err:
            source = plan.budget_sources.get(placement)
            given = f" (its budget: {source})" if source else ""
            raise DeviceError(
                f"the plan places units on {placement}{given}, which cannot run here: {err}. "
                "Plan for this machine's devices (leave them out of max_memory to use what is "
                "detected)."
            ) from err


def refuse_meta(model: nn.Module, plan: DevicePlan, store: OffloadStore) -> None:
    """A MetaTensorError listing every tensor of ``model`` still on meta and not served by
    ``store``: nothing runs on uninitialised memory."""
    slots = [s for s in unique_slots(model)
             if s.tensor.device.type == "meta" and s.fqn not in store.items
             and (not s.persistent or plan.holds(s.fqn))]  # another rank's: meta on purpose
    nonpersistent = [s for s in slots if not s.persistent]
    if nonpersistent:  # no checkpoint can fill them: the skeleton was built wrongly
        raise meta_problems(nonpersistent, "error", None, plan.main)  # type: ignore[misc]
    metas = [f"{s.fqn!r} planned for {_planned(plan, s.fqn)}" for s in slots]
    if metas:
        raise MetaTensorError(
            f"{len(metas)} tensor(s) of {type(model).__name__} are on 'meta' (no data), so they "
            "cannot be dispatched:\n" + format_problems(metas)
            + "\nLoad them first (bigload.load_checkpoint_and_dispatch does both) or "
            "bigload.materialize(model, device, missing='init')."
        )


def _planned(plan: DevicePlan, fqn: str) -> str:
    unit = plan.unit_of(fqn)
    return placement_str(plan.placement_of(fqn)) if unit is not None else "the main device"


def _offload_in_memory(model, slots, plan, store, offload_folder, journal) -> None:  # noqa: ANN001
    """Disk-placed tensors held in memory are written once to the offload folder and replaced
    by views of it (a tensor initialised in memory for a disk unit stays in the CPU tier)."""
    todo = [s for s in slots if s.persistent and s.fqn not in store.items
            and plan.unit_of(s.fqn) is not None and plan.placement_of(s.fqn) == DISK]
    if not todo:
        return
    if offload_folder is None:
        raise OffloadError(
            f"{len(todo)} tensor(s) are placed on disk but held in memory, e.g. {todo[0].fqn!r}; "
            "pass offload_dir=... to write them there once (or load them with "
            "bigload.load_checkpoint_and_dispatch, which serves safetensors files directly)"
        )
    items = [OffloadItem(s.fqn, s.tensor.dtype, tuple(s.tensor.shape), lambda s=s: s.tensor)
             for s in todo]
    served = serve_from_folder(offload_folder, items)
    store.readers.extend(served.readers)
    store.bytes_written += served.bytes_written
    for slot in todo:
        item = served.tensors[slot.fqn]
        store.add(item)
        journal.replace(slot, item.tensor)


