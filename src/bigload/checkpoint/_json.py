"""The JSON of checkpoints (safetensors headers, shard indexes), parsed within bounds: a size cap,
a nesting cap checked before parsing, and duplicate keys refused (the safetensors library refuses
them too; ``json.loads`` would keep the last one silently)."""

from __future__ import annotations

import contextlib
import gc
import json
import re
from collections.abc import Iterator

# json.loads takes ~55 ms per MB on a slow core and ~10x the text in memory; 32 MiB holds the
# header of about 250,000 tensors (a 671B-parameter MoE stored as one file needs ~15 MiB).
MAX_JSON_BYTES = 32 * 1024 * 1024
MAX_DEPTH = 32  # a safetensors header nests 3 levels, a shard index 2 or 3
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# brackets only, both kinds as "[" and "]": a depth bound needs no pairing of kinds (json does that)
_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class JsonProblem(ValueError):
    """Why a JSON document was refused (internal: callers raise their own typed error)."""


def parse_object(raw: bytes) -> dict:
    """The JSON object in ``raw``; :class:`JsonProblem` when it is too large, too deep, not JSON,
    not an object, or repeats a key in any object."""
    if len(raw) > MAX_JSON_BYTES:
        raise JsonProblem(f"it is {len(raw)} bytes, more than bigload parses ({MAX_JSON_BYTES})")
    nesting = _nesting_problem(raw)
    if nesting:
        raise JsonProblem(nesting)
    try:
        with no_gc():
            doc = json.loads(raw, object_pairs_hook=_unique_keys)
    except JsonProblem:
        raise
    except (ValueError, RecursionError) as err:
        raise JsonProblem(f"it is not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise JsonProblem(f"it is a JSON {type(doc).__name__}, not an object")
    return doc


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while many small objects are built (it would run
    again and again over the growing heap: the parse of a large header takes twice as long)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    doc = dict(pairs)
    if len(doc) == len(pairs):
        return doc
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise JsonProblem(f"key {key[:200]!r} appears twice in one object")
        seen.add(key)
    raise AssertionError("unreachable: a dict of fewer keys than pairs repeats a key")


def _nesting_problem(raw: bytes) -> str | None:
    """Whether the brackets outside strings nest deeper than MAX_DEPTH or do not pair: each pass
    removes the innermost pairs, so MAX_DEPTH passes empty any shallow enough document."""
    brackets = _outside_strings(raw).translate(_SQUARE, _NOT_BRACKETS)
    unpaired = "it is not valid JSON (its brackets do not pair)"
    if brackets.count(b"[") * 2 != len(brackets):
        return unpaired
    too_deep = b"[" * (MAX_DEPTH + 1)
    for _ in range(MAX_DEPTH + 1):
        if not brackets:
            return None
        if too_deep in brackets:
            break
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return unpaired
        brackets = shorter
    return f"it nests deeper than {MAX_DEPTH} levels"


def _outside_strings(raw: bytes) -> bytes:
    """``raw`` without its JSON strings: split on quotes when no quote is escaped (fast)."""
    if b'\\"' in raw:
        return _STRING.sub(b"", raw)
    return b"".join(raw.split(b'"')[0::2])
