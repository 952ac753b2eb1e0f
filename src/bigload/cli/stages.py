"""Where the time and memory of ``bigload run`` go, each stage measured on its own: imports
(torch, transformers and the model's code), skeleton, plan, load, run; the resident memory
before the load and its peak after.

``bigload.load`` is one call; the skeleton and plan stages inside it are timed by wrapping the
names ``bigload.hf.pretrained`` calls (``build_skeleton``, ``plan_model``) while it runs, which
is also how the plan is shown as soon as it exists; a test fails if a refactor of bigload.hf
stops calling them (tests/cli/test_cli_run.py).
"""

from __future__ import annotations

import importlib
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("imports", "fetch", "skeleton", "plan", "load", "run")


@dataclass
class Clock:
    """Seconds per stage; a stage entered twice (two models in a pipeline) adds up."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def ordered(self) -> dict[str, float]:
        return {name: self.seconds[name] for name in STAGES if name in self.seconds}


@contextmanager
def timed_load(clock: Clock, on_plan: Callable[[Any, Any], None] | None) -> Iterator[None]:
    """Around one ``bigload.load`` call: its skeletons and plans are timed as the 'skeleton'
    and 'plan' stages, each plan is handed to ``on_plan(model, plan)`` as soon as it exists,
    and the rest of the call is the 'load' stage (``on_plan``'s own time is in none). Within
    load, transformers' checkpoint conversions are timed too ('conversions')."""
    from bigload.hf import pretrained

    saved = {name: getattr(pretrained, name) for name in ("build_skeleton", "plan_model",
                                                          "prepare_checkpoint")}
    outside = Clock()

    def skeleton(*args: Any, **kwargs: Any) -> Any:
        with clock.stage("skeleton"), outside.stage("inner"):
            return saved["build_skeleton"](*args, **kwargs)

    def plan(model: Any, **kwargs: Any) -> Any:
        with clock.stage("plan"), outside.stage("inner"):
            planned = saved["plan_model"](model, **kwargs)
        if on_plan is not None:
            with outside.stage("inner"):
                on_plan(model, planned)
        return planned

    def conversions(*args: Any, **kwargs: Any) -> Any:
        with clock.stage("conversions"):
            return saved["prepare_checkpoint"](*args, **kwargs)

    wrappers = {"build_skeleton": skeleton, "plan_model": plan, "prepare_checkpoint": conversions}
    for name, wrapper in wrappers.items():
        setattr(pretrained, name, wrapper)
    try:
        with outside.stage("call"):
            yield
    finally:
        for name, original in saved.items():
            setattr(pretrained, name, original)
        spent = outside.seconds
        clock.seconds["load"] = clock.seconds.get("load", 0.0) + spent.get("call", 0.0) - \
            spent.get("inner", 0.0)


def import_libraries() -> None:
    """torch, transformers and the parts of bigload a load runs."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    for module in ("bigload.hf", "bigload.loader", "bigload.runtime", "bigload.plan"):
        importlib.import_module(module)


def import_model_code(folder: Path, *, sentence: bool) -> None:
    """Import now what loading ``folder`` would import on the way, so that the load stage is
    the load: the model's and tokenizer's classes, sentence-transformers and the module types
    its modules.json names. What cannot be imported is left to the load to report."""
    import transformers

    from bigload.hf import transformer_folder

    if sentence:
        import sentence_transformers  # noqa: F401

        for module_type in _json_values(folder / "modules.json", "type"):
            _try_import(module_type)
    model = transformer_folder(folder)
    names = _json_values(model / "config.json", "architectures")
    names += _json_values(model / "tokenizer_config.json", "tokenizer_class")
    for name in names:
        for candidate in (name, f"{name}Fast"):
            try:
                getattr(transformers, candidate)
            except (AttributeError, ImportError, RuntimeError):
                pass


def _json_values(path: Path, key: str) -> list[str]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    items = data if isinstance(data, list) else [data]
    values: list[str] = []
    for item in items:
        value = item.get(key) if isinstance(item, dict) else None
        values += value if isinstance(value, list) else [value] if value else []
    return [v for v in values if isinstance(v, str)]


def _try_import(dotted: str) -> None:
    """``package.module.Class`` as sentence-transformers resolves a module type: import the
    module. Its deprecation warnings are the library's to give or not (it silences them for
    types read from a model's files, as here)."""
    import warnings

    module = dotted.rpartition(".")[0] or dotted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            importlib.import_module(module)
        except ImportError:
            pass


# --- memory ------------------------------------------------------------------------------------
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Start the peak-RSS count from now (Linux: ``echo 5 > /proc/self/clear_refs``); False
    where the peak can only be the process's lifetime peak."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _vm_hwm() is not None


def peak_rss_bytes() -> int:
    """The peak resident memory: since :func:`reset_peak_rss` on Linux, else of the process
    (ru_maxrss: KiB on Linux, bytes on macOS)."""
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _vm_hwm() -> int | None:
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_accelerator_peaks() -> None:
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def accelerator_peaks() -> dict[str, int]:
    """Peak memory allocated by torch on each accelerator it used (none on a CPU machine)."""
    import torch

    peaks = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            peak = torch.cuda.max_memory_allocated(i)
            if peak:
                peaks[f"cuda:{i}"] = int(peak)
    return peaks
