"""The shape of the code, checked: no import cycle between bigload's modules (function-local
imports included), no import of another module's private names, no module past ~400 lines, no
environment variables read outside the one documented place, no store hidden on the model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bigload"
MAX_LINES = 420
# huggingface_hub's own settings (HF_HUB_OFFLINE, HF_ENDPOINT); torchrun's (RANK, LOCAL_RANK...)
ENVIRONMENT_READERS = {"hub.py", "group.py"}


def modules() -> dict[str, Path]:
    return {_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every bigload import in ``path``, at any depth
    (function-local ones included; ``if TYPE_CHECKING:`` ones are not imports at run time)."""
    package = _name(path) if path.name == "__init__.py" else _name(path).rpartition(".")[0]
    found = []
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "bigload":
                found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "bigload"]
    return found


def _resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The modules an import really loads: ``from .x import y`` loads ``x``, or ``x.y`` when y is
    a submodule."""
    return [f"{target}.{n}" if f"{target}.{n}" in known else target for n in names or [""]]


def test_no_import_cycles():
    known = modules()
    graph = {m: {t for target, names in imports(p) for t in _resolve(target, names, known)
                 if t in known and t != m and not m.startswith(t + ".")}
             for m, p in known.items()}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(" -> ".join([*path, nxt]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, "\n".join(sorted(set(cycles))[:10])


def test_no_module_imports_another_modules_private_names():
    offenders = [f"{_name(p)}: from {target} import {name}"
                 for p in SRC.rglob("*.py") for target, names in imports(p) for name in names
                 if name.startswith("_") and not name.startswith("__")]
    assert not offenders, offenders


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: _name(p))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{_name(path)} has {lines} lines: split its concepts"


def test_environment_is_read_in_one_documented_place():
    readers = {p.name for p in SRC.rglob("*.py") if "os.environ" in p.read_text()
               or "getenv(" in p.read_text()}
    assert readers <= ENVIRONMENT_READERS, readers - ENVIRONMENT_READERS


def test_no_store_or_decision_travels_as_a_hidden_model_attribute():
    text = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    assert "_bigload_store" not in text
    assert "startswith(\"no-split\")" not in text and '"tie group" in' not in text
