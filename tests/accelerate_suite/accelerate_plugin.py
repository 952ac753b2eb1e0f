"""pytest plugin for a run of accelerate's own test files with bigload's functions swapped in.

Loaded with ``-p accelerate_plugin`` by ``accelerate_harness.run_suite`` in a subprocess; it
reads its settings from the environment:

* ``BIGLOAD_ACC_SCOPE`` — where bigload's functions replace accelerate's:
  ``public`` (default): the test modules' globals (the names they import) and the re-export
  namespaces ``accelerate`` and ``accelerate.utils`` (a test's ``from accelerate import X``
  inside its body); accelerate's own modules keep calling accelerate's functions, so its hooks
  and helpers are not run with bigload's internals.
  ``deep``: also every global of every ``accelerate.*`` module bound to a swapped function
  (accelerate's own code then calls bigload's functions too).
  ``none``: nothing swapped (a control run with accelerate itself).
* ``BIGLOAD_ACC_RESULTS`` — the JSON file the per-test results are written to.

A swapped function is every public bigload name that accelerate also offers (so the set grows
with bigload's API). Each is wrapped to record, per test, which swapped functions it called and
what they raised. accelerate's ``remove_hook_from_submodules`` becomes a shim that removes
bigload's hooks (``bigload.remove_hooks``) and then accelerate's, since the tests undo a
dispatch with it. Tests are *counted* when they call a swapped function at run time or name
one in their source (the test method, the ``self.`` helpers and module functions it calls), so
a test skipped here (GPU-only) is still known to exercise bigload.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import os
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

# accelerate's big-model API is defined in these two modules; a bigload function of the same
# name as a function defined there is swapped in (``bigload.load`` is not ``accelerate.utils.load``)
BIG_MODEL_MODULES = ("accelerate.big_modeling", "accelerate.utils.modeling")
PUBLIC_NAMESPACES = ("accelerate", "accelerate.utils")
REMOVE_HOOKS_ALIAS = "remove_hook_from_submodules"
MAX_TEXT = 4000

_scope = os.environ.get("BIGLOAD_ACC_SCOPE", "public")
_originals: dict[str, Any] = {}  # swapped name -> accelerate's function
_wrappers: dict[str, Any] = {}  # swapped name -> recording wrapper of bigload's function
_current: str | None = None
_records: dict[str, dict[str, Any]] = {}


def _record(nodeid: str) -> dict[str, Any]:
    return _records.setdefault(nodeid, {
        "calls": Counter(), "bigload_errors": [], "reports": [], "refs": [], "duration": 0.0,
    })


# --- what is swapped ------------------------------------------------------------------------
def swappable() -> dict[str, tuple[Any, Any]]:
    """name -> (accelerate's function, bigload's function) for every public bigload function
    whose name accelerate's big-model modules define as a function."""
    import bigload

    found: dict[str, tuple[Any, Any]] = {}
    for name in bigload.__all__:
        ours = getattr(bigload, name)
        if not inspect.isfunction(ours):
            continue
        for module_name in BIG_MODEL_MODULES:
            theirs = getattr(importlib.import_module(module_name), name, None)
            if inspect.isfunction(theirs) and theirs.__module__ == module_name:
                found[name] = (theirs, ours)
                break
    return found


def _wrap(name: str, function: Any) -> Any:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        record = _record(_current) if _current else None
        if record is not None:
            record["calls"][name] += 1
        try:
            return function(*args, **kwargs)
        except BaseException as err:
            if record is not None:
                record["bigload_errors"].append(f"{name}: {type(err).__name__}: {err}"[:MAX_TEXT])
            raise

    wrapper.__bigload_swapped__ = name
    return wrapper


def _remove_hooks_shim(original: Any) -> Any:
    import bigload

    @functools.wraps(original)
    def shim(module: Any, *args: Any, **kwargs: Any) -> Any:
        bigload.remove_hooks(module)
        return original(module, *args, **kwargs)

    return shim


def _patch_namespace(namespace: Any, replacements: dict[int, Any]) -> None:
    """Replace every global of ``namespace`` that *is* one of accelerate's swapped functions."""
    for key, value in list(vars(namespace).items()):
        if id(value) in replacements:
            setattr(namespace, key, replacements[id(value)])


def install(test_modules: list[Any]) -> None:
    if _scope == "none":
        return
    replacements: dict[int, Any] = {}
    for name, (theirs, ours) in swappable().items():
        _originals[name] = theirs
        _wrappers[name] = _wrap(name, ours)
        replacements[id(theirs)] = _wrappers[name]
    hooks = importlib.import_module("accelerate.hooks")
    alias = {id(getattr(hooks, REMOVE_HOOKS_ALIAS)): _remove_hooks_shim(
        getattr(hooks, REMOVE_HOOKS_ALIAS))}
    for module in test_modules:
        _patch_namespace(module, {**replacements, **alias})
    for name in PUBLIC_NAMESPACES:
        _patch_namespace(importlib.import_module(name), replacements)
    if _scope == "deep":
        for name, module in list(sys.modules.items()):
            if name.startswith("accelerate") and module is not None:
                _patch_namespace(module, {**replacements, **alias})


# --- which tests name a swapped function ----------------------------------------------------
def _names_used(function: Any) -> tuple[set[str], set[str]]:
    """Bare names and ``self.<attr>`` names used in ``function``'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(function)))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return set(), set()
    names, attrs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "self"):
            attrs.add(node.attr)
    return names, attrs


def static_refs(item: pytest.Item, swapped: set[str]) -> list[str]:
    """Swapped names the test's source uses, following ``self.`` helpers and module functions."""
    cls, module = getattr(item, "cls", None), item.module
    start = getattr(cls, item.name, None) if cls else getattr(module, item.name, None)
    if start is None:
        start = getattr(item, "obj", None)
    todo, seen, found = [start], set(), set()
    while todo:
        function = todo.pop()
        if function is None or id(function) in seen:
            continue
        seen.add(id(function))
        names, attrs = _names_used(function)
        found |= names & swapped
        for cell in getattr(function, "__closure__", None) or ():  # parameterized's wrappers
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if inspect.isfunction(contents):
                todo.append(contents)
        for attr in attrs:
            target = getattr(cls, attr, None) if cls else None
            if inspect.isfunction(target):
                todo.append(target)
        for name in names:
            target = vars(module).get(name)
            if inspect.isfunction(target) and target.__module__ == module.__name__:
                todo.append(target)
    return sorted(found)


# --- pytest hooks ---------------------------------------------------------------------------
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    modules = list({id(item.module): item.module for item in items}.values())
    install(modules)
    swapped = set(_wrappers) or set(swappable())
    for item in items:
        _record(item.nodeid)["refs"] = static_refs(item, swapped)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    global _current
    _current = item.nodeid
    started = time.perf_counter()
    try:
        return (yield)
    finally:
        _record(item.nodeid)["duration"] = round(time.perf_counter() - started, 3)
        _current = None


def _failure(report: pytest.TestReport, test_file: str) -> dict[str, Any]:
    """What failed and where: the exception, the test line that raised, the deepest frame."""
    longrepr = report.longrepr
    info: dict[str, Any] = {}
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        info["message"] = crash.message[:MAX_TEXT]
        where = f"{_short_path(crash.path)}:{crash.lineno}"
        # raised by the call itself (arguments that do not fit the signature)
        info["raised_at"] = "the call into bigload" if Path(crash.path) == Path(__file__) else where
    entries = getattr(getattr(longrepr, "reprtraceback", None), "reprentries", None) or []
    for entry in entries:
        location = getattr(entry, "reprfileloc", None)
        if location is not None and Path(location.path).name == test_file:
            failing = [line[1:].strip() for line in entry.lines if line.startswith(">")]
            info["test_line"] = f"{test_file}:{location.lineno}"
            info["test_source"] = failing[-1] if failing else ""
    if not info:
        info["message"] = str(longrepr)[-MAX_TEXT:]
    info["longrepr"] = str(longrepr)[-MAX_TEXT:]
    return info


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "/src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return Path(path).name


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry: dict[str, Any] = {"when": report.when, "outcome": report.outcome}
    context = getattr(report, "context", None)  # a unittest subTest
    if context is not None:
        entry["subtest"] = str(getattr(context, "msg", "") or getattr(context, "kwargs", ""))
    if report.skipped:
        longrepr = report.longrepr
        entry["reason"] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    elif report.failed:
        entry.update(_failure(report, report.nodeid.split("::", 1)[0].split("/")[-1]))
    if report.passed and report.when != "call" and context is None:
        return
    _record(report.nodeid)["reports"].append(entry)


def _outcome(reports: list[dict[str, Any]]) -> str:
    if any(r["outcome"] == "failed" and r["when"] == "call" for r in reports):
        return "failed"
    if any(r["outcome"] == "failed" for r in reports):
        return "error"
    if any(r["outcome"] == "skipped" for r in reports):
        return "skipped"
    return "passed" if reports else "not run"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("BIGLOAD_ACC_RESULTS")
    if not path:
        return
    tests = {}
    for nodeid, record in _records.items():
        calls = dict(sorted(record["calls"].items()))
        failures = [r for r in record["reports"] if r["outcome"] == "failed"]
        skips = [r["reason"] for r in record["reports"] if r["outcome"] == "skipped"]
        tests[nodeid] = {
            "outcome": _outcome(record["reports"]),
            "counted": bool(calls or record["refs"]),
            "bigload_calls": calls,
            "bigload_refs": record["refs"],
            "bigload_errors": record["bigload_errors"][:10],
            "failures": failures,
            "skip_reason": skips[0] if skips else None,
            "duration_s": record["duration"],
        }
    import accelerate

    import bigload

    summary = {
        "scope": _scope,
        "accelerate_version": accelerate.__version__,
        "bigload_file": bigload.__file__,
        "swapped": sorted(_wrappers),
        "tests": tests,
    }
    Path(path).write_text(json.dumps(summary, indent=1, sort_keys=False))
