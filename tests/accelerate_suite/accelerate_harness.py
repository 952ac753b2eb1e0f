"""Run accelerate's own big-model test files against bigload and judge the outcome.

accelerate's sdist ships its tests; the one matching the installed accelerate is downloaded at
test time (never committed here), its four big-model test files are extracted into a cache
folder, and pytest runs them in a subprocess with ``accelerate_plugin`` swapping bigload's
functions in (see that module for what is swapped, where, and which tests are *counted*).
Counted tests that fail under bigload are rerun with accelerate itself (a control): a test that
fails there too is broken in this environment, not by bigload. The verdict compares the rest
with ``expected_failures.toml``.

    python tests/accelerate_suite/accelerate_harness.py            # table of counted tests
    python tests/accelerate_suite/accelerate_harness.py --json out.json --scope deep

Environment: ``BIGLOAD_ACCELERATE_TESTS`` names a folder that already holds the four files
(directly or in ``tests/``), for machines without network; ``BIGLOAD_TEST_CACHE`` moves the
cache (default ``$XDG_CACHE_HOME/bigload-test`` or ``~/.cache/bigload-test``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before 3.11
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
TEST_FILES = ("test_big_modeling.py", "test_modeling_utils.py", "test_offload.py", "test_hooks.py")
EXPECTED_FILE = HERE / "expected_failures.toml"
ENV_TESTS = "BIGLOAD_ACCELERATE_TESTS"
ENV_CACHE = "BIGLOAD_TEST_CACHE"
CATEGORIES = {
    "message-wording": "pins accelerate's message wording",
    "accelerate-internals": "accelerate internals (hook classes, _hf_hook, offload index format…)",
    "deliberate": "deliberate behaviour change: never leave meta / budgets kept",
    "gpu-only": "GPU-only",
    "missing-compat": "to fix: accelerate argument or behaviour bigload lacks",
    "bug": "to fix: bigload bug",
}
TIMEOUT_S = 900


class HarnessError(RuntimeError):
    """The accelerate test files could not be found, downloaded or run."""


# --- locating accelerate's tests ------------------------------------------------------------
def accelerate_version() -> str:
    try:
        return importlib.metadata.version("accelerate")
    except importlib.metadata.PackageNotFoundError as err:
        raise HarnessError("accelerate is not installed: pip install -e '.[test]'") from err


def cache_root() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bigload-test"


def _holding_folder(folder: Path) -> Path | None:
    for candidate in (folder, folder / "tests"):
        if all((candidate / name).is_file() for name in TEST_FILES):
            return candidate
    return None


def locate_tests(version: str | None = None) -> Path:
    """The folder holding accelerate's four test files: ``$BIGLOAD_ACCELERATE_TESTS``, else the
    cache, else downloaded now. Raises ``HarnessError`` (never skips) when none can be had."""
    if os.environ.get(ENV_TESTS):
        given = Path(os.environ[ENV_TESTS])
        found = _holding_folder(given)
        if found is None:
            raise HarnessError(f"{ENV_TESTS}={given} does not hold {', '.join(TEST_FILES)} "
                               "(directly or in tests/).")
        return found
    version = version or accelerate_version()
    target = cache_root() / f"accelerate-{version}" / "tests"
    if _holding_folder(target) is None:
        _download_tests(version, target)
    return target


def _download_tests(version: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="bigload-acc-") as tmp:
        sdist = _download_sdist(version, Path(tmp))
        staging = Path(tmp) / "tests"
        staging.mkdir()
        with tarfile.open(sdist) as archive:
            members = {Path(m.name).name: m for m in archive.getmembers()
                       if m.isfile() and Path(m.name).parent.name == "tests"
                       and Path(m.name).name in TEST_FILES}
            missing = sorted(set(TEST_FILES) - set(members))
            if missing:
                raise HarnessError(f"{sdist.name} has no tests/{', tests/'.join(missing)}.")
            for name, member in members.items():
                (staging / name).write_bytes(archive.extractfile(member).read())
        (staging / "SOURCE").write_text(f"{sdist.name} sha256={_sha256(sdist)}\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), target)


def _download_sdist(version: str, folder: Path) -> Path:
    """pip (honouring pip's index configuration), else PyPI's JSON API with its sha256."""
    errors = []
    command = [sys.executable, "-m", "pip", "download", f"accelerate=={version}",
               "--no-binary", ":all:", "--no-deps", "--retries", "1", "-q", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    found = sorted(folder.glob(f"accelerate-{version}.tar.gz"))
    if result.returncode == 0 and found:
        return found[0]
    errors.append(f"{' '.join(command[2:5])}: {(result.stderr or result.stdout).strip()[-800:]}")
    try:
        return _download_from_pypi_json(version, folder)
    except (OSError, ValueError, KeyError) as err:
        errors.append(f"https://pypi.org/pypi/accelerate/{version}/json: {err}")
    raise HarnessError(
        f"could not download accelerate {version}'s sdist (for its test files):\n  "
        + "\n  ".join(errors)
        + f"\nWith no network, extract tests/{{{','.join(TEST_FILES)}}} from "
        f"accelerate-{version}.tar.gz and set {ENV_TESTS} to that folder."
    )


def _download_from_pypi_json(version: str, folder: Path) -> Path:
    with urllib.request.urlopen(f"https://pypi.org/pypi/accelerate/{version}/json",
                                timeout=60) as response:
        release = json.load(response)
    sdist = next(u for u in release["urls"] if u["packagetype"] == "sdist")
    path = folder / sdist["filename"]
    with urllib.request.urlopen(sdist["url"], timeout=120) as response:
        path.write_bytes(response.read())
    if _sha256(path) != sdist["digests"]["sha256"]:
        raise ValueError(f"{sdist['filename']}: sha256 does not match PyPI's")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- running them ---------------------------------------------------------------------------
def run_suite(tests_dir: Path, *, scope: str = "public", select: list[str] | None = None,
              workdir: Path | None = None, control: bool = True,
              known: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Run the files (or the ``select``ed node ids) with bigload swapped in; returns the
    plugin's summary. With ``control``, counted failures not in ``known`` are rerun under
    accelerate itself and get a ``control_outcome``."""
    for module in ("parameterized", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise HarnessError(f"accelerate's test files import {module!r}: "
                               "pip install -e '.[test]'")
    with tempfile.TemporaryDirectory(prefix="bigload-acc-run-") as tmp:
        work = workdir or Path(tmp)
        summary = _pytest_subprocess(tests_dir, work, scope, select or list(TEST_FILES))
        failing = [t for t, r in summary["tests"].items()
                   if r["counted"] and r["outcome"] in ("failed", "error") and t not in known]
        if control and failing and scope != "none":
            reference = _pytest_subprocess(tests_dir, work, "none", failing)["tests"]
            for test in failing:
                summary["tests"][test]["control_outcome"] = reference.get(
                    test, {}).get("outcome", "not run")
    return summary


def _pytest_subprocess(tests_dir: Path, work: Path, scope: str,
                       select: list[str]) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    ini = work / "pytest.ini"
    ini.write_text("[pytest]\n")  # not bigload's own pytest settings (addopts, markers)
    results = work / f"results-{scope}.json"
    results.unlink(missing_ok=True)
    src = Path(importlib.util.find_spec("bigload").origin).parent.parent
    env = dict(os.environ, BIGLOAD_ACC_SCOPE=scope, BIGLOAD_ACC_RESULTS=str(results))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(tests_dir),
               "-p", "accelerate_plugin", "-p", "no:cacheprovider", "-q", "--tb=long",
               "-W", "ignore::DeprecationWarning", *select]
    try:
        result = subprocess.run(command, cwd=tests_dir, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise HarnessError(f"accelerate's tests ran past {TIMEOUT_S} s") from err
    if not results.is_file():
        raise HarnessError(f"pytest wrote no results (exit {result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")
    summary = json.loads(results.read_text())
    summary["pytest_exit"] = result.returncode
    summary["pytest_tail"] = (result.stdout + result.stderr)[-2000:]
    return summary


# --- judging --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Expected:
    test: str
    category: str
    reason: str
    gpu: bool = False  # predicted from the source for a test that needs an accelerator


def load_expected(path: Path = EXPECTED_FILE) -> dict[str, Expected]:
    data = tomllib.loads(path.read_text())
    entries: dict[str, Expected] = {}
    problems = []
    for raw in data.get("failure", []):
        entry = Expected(**raw)
        if entry.category not in CATEGORIES:
            problems.append(f"{entry.test}: category {entry.category!r} not in {list(CATEGORIES)}")
        if not entry.reason.strip():
            problems.append(f"{entry.test}: no reason")
        if entry.test in entries:
            problems.append(f"{entry.test}: listed twice")
        entries[entry.test] = entry
    if problems:
        raise ValueError(f"{path}:\n  " + "\n  ".join(problems))
    return entries


@dataclasses.dataclass
class Verdict:
    unexpected_failures: list[str]  # counted, failed, not listed (and accelerate passes them)
    unexpected_passes: list[str]  # listed, but passed
    unknown_entries: list[str]  # listed, but no counted test of that id ran or was collected
    environment_failures: list[str]  # fail under accelerate itself too: not counted
    not_run: list[str]  # counted but skipped here (GPU, slow)
    counts: dict[str, int]

    @property
    def ok(self) -> bool:
        return not (self.unexpected_failures or self.unexpected_passes or self.unknown_entries)


def judge(summary: dict[str, Any], expected: dict[str, Expected]) -> Verdict:
    tests = summary["tests"]
    counted = {t: r for t, r in tests.items() if r["counted"]}
    failed = {t for t, r in counted.items() if r["outcome"] in ("failed", "error")}
    environment = {t for t in failed if counted[t].get("control_outcome") in ("failed", "error")}
    failed -= environment
    passed = {t for t, r in counted.items() if r["outcome"] == "passed"}
    counts = Counter(r["outcome"] for r in counted.values())
    return Verdict(
        unexpected_failures=sorted(failed - set(expected)),
        unexpected_passes=sorted(passed & set(expected)),
        unknown_entries=sorted(set(expected) - set(counted)),
        environment_failures=sorted(environment),
        not_run=sorted(t for t, r in counted.items() if r["outcome"] == "skipped"),
        counts={"total": len(tests), "counted": len(counted), **counts,
                "expected_failures": len(failed & set(expected))},
    )


def explain(verdict: Verdict, summary: dict[str, Any]) -> str:
    """A report of what is wrong with the verdict, for the assertion message."""
    lines = [f"accelerate {summary['accelerate_version']} tests against bigload "
             f"(scope {summary['scope']}): {verdict.counts}"]
    for test in verdict.unexpected_failures:
        lines.append(f"UNEXPECTED FAILURE {test}")
        lines.extend(f"    {line}" for line in describe(summary["tests"][test]))
    for test in verdict.unexpected_passes:
        lines.append(f"NOW PASSES (remove it from {EXPECTED_FILE.name}) {test}")
    for test in verdict.unknown_entries:
        lines.append(f"LISTED BUT NOT A COUNTED TEST (remove or rename) {test}")
    for test in verdict.environment_failures:
        lines.append(f"fails under accelerate itself too (not counted) {test}")
    return "\n".join(lines)


def describe(result: dict[str, Any]) -> list[str]:
    lines = []
    for failure in result["failures"]:
        where = failure.get("test_line", "")
        sub = f"[{failure['subtest']}] " if failure.get("subtest") else ""
        message = failure.get("message", "").strip().splitlines()
        lines.append(f"{sub}{where}: {failure.get('test_source', '')}")
        lines.append(f"  -> {message[0] if message else ''} (raised at {failure.get('raised_at')})")
    return lines


# --- signatures -----------------------------------------------------------------------------
def signature_differences() -> dict[str, list[str]]:
    """For each swapped function: accelerate's parameters bigload lacks, and where accelerate's
    positional order (what a positional call binds) differs from bigload's."""
    import inspect

    sys.path.insert(0, str(HERE))
    from accelerate_plugin import swappable

    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    report: dict[str, list[str]] = {}
    for name, (theirs, ours) in sorted(swappable().items()):
        their_params = inspect.signature(theirs).parameters
        our_params = inspect.signature(ours).parameters
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in our_params.values())
        notes = []
        missing = [p for p in their_params if p not in our_params and not takes_kwargs
                   and their_params[p].kind not in (inspect.Parameter.VAR_KEYWORD,)]
        if missing:
            notes.append("lacks " + ", ".join(missing))
        their_pos = [p for p, v in their_params.items() if v.kind in positional]
        our_pos = [p for p, v in our_params.items() if v.kind in positional]
        for i, param in enumerate(their_pos):
            ours_at = our_pos[i] if i < len(our_pos) else None
            if ours_at != param:
                notes.append(f"positional #{i + 1}: accelerate {param!r}, bigload "
                             + (repr(ours_at) if ours_at else "none (keyword-only or absent)")
                             + f"; accelerate's order ({', '.join(their_pos)})")
                break
        if notes:
            report[name] = notes
    return report


# --- command line ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scope", choices=("public", "deep", "none"), default="public")
    parser.add_argument("--json", type=Path, help="write the full summary here")
    parser.add_argument("--no-control", action="store_true",
                        help="do not rerun failures under accelerate itself")
    parser.add_argument("--signatures", action="store_true",
                        help="only list how bigload's signatures differ from accelerate's")
    parser.add_argument("select", nargs="*", help="test files or node ids (default: all four)")
    args = parser.parse_args(argv)
    if args.signatures:
        for name, notes in signature_differences().items():
            print(f"{name}:\n" + "\n".join(f"    {note}" for note in notes))
        return 0
    summary = run_suite(locate_tests(), scope=args.scope, select=args.select or None,
                        control=not args.no_control)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    expected = load_expected()
    for test, result in summary["tests"].items():
        if not result["counted"]:
            continue
        listed = expected.get(test)
        tag = f"  [{listed.category}]" if listed else ""
        control = result.get("control_outcome")
        control = f" (accelerate: {control})" if control else ""
        print(f"{result['outcome']:8} {test}{tag}{control}")
        if result["outcome"] in ("failed", "error"):
            print("\n".join(f"           {line}" for line in describe(result)))
    verdict = judge(summary, expected)
    print(explain(verdict, summary))
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
