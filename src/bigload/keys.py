"""Matching checkpoint keys to model fqns: explicit renames, then a detected prefix to add or strip.

Pure functions over names; no tensors. A base model's checkpoint into a task model (``bert.``),
``module.`` from DataParallel and ``model.`` wrappers are all one rule: the unique prefix change
that matches most names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Renames older checkpoints still carry (data, not code): applied only where they make a name match.
LEGACY_SUFFIXES: tuple[tuple[str, str], ...] = ((".gamma", ".weight"), (".beta", ".bias"))


@dataclass(frozen=True)
class KeyMatch:
    """Model fqn → checkpoint key for every name that matches, plus how the match was made."""

    model_to_ckpt: Mapping[str, str]
    prefix_change: str | None  # e.g. "added 'bert.'" / "stripped 'module.'"


def apply_key_map(keys: Iterable[str], key_map: Mapping[str, str] | None) -> dict[str, str]:
    """Renamed checkpoint key → original key, with ``key_map`` as regex → replacement."""
    rules = [(re.compile(pattern), repl) for pattern, repl in (key_map or {}).items()]
    out: dict[str, str] = {}
    for key in keys:
        name = key
        for pattern, repl in rules:
            name = pattern.sub(repl, name)
        out.setdefault(name, key)
    return out


def _candidate_prefixes(names: Iterable[str], others: set[str]) -> set[str]:
    found: set[str] = set()
    for name in names:
        if name in others:
            continue
        parts = name.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                found.add(".".join(parts[:depth]) + ".")
    return found


def _strip(prefix: str, names: Iterable[str], model: set[str]) -> dict[str, str]:
    return {n[len(prefix):] if n.startswith(prefix) and n not in model else n: n for n in names}


def _add(prefix: str, names: Iterable[str], model: set[str]) -> dict[str, str]:
    return {prefix + n if n not in model and prefix + n in model else n: n for n in names}


def match_keys(model_keys: Iterable[str], ckpt_keys: Iterable[str]) -> KeyMatch:
    """Match by identity, or by the one prefix change that matches strictly more names."""
    model = set(model_keys)
    ckpt = list(ckpt_keys)
    best = {n: n for n in ckpt}
    best_score, best_note, tie = len(model & set(ckpt)), None, False
    options = [(f"stripped {p!r}", _strip(p, ckpt, model)) for p in sorted(
        _candidate_prefixes(ckpt, model))]
    options += [(f"added {p!r}", _add(p, ckpt, model)) for p in sorted(
        _candidate_prefixes(model, set(ckpt)))]
    for note, mapping in options:
        score = len(model & mapping.keys())
        if score > best_score:
            best, best_score, best_note, tie = mapping, score, note, False
        elif score == best_score and best_note is not None and mapping != best:
            tie = True
    if tie:
        logger.warning("several prefix changes match the checkpoint equally well; using none")
        best, best_note = {n: n for n in ckpt}, None
    best = _legacy_renames(best, model)
    if best_note:
        logger.info("checkpoint keys %s to match the model", best_note)
    return KeyMatch({m: c for m, c in best.items() if m in model}, best_note)


def _legacy_renames(mapping: dict[str, str], model: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, key in mapping.items():
        if name not in model:
            for old, new in LEGACY_SUFFIXES:
                if name.endswith(old) and name[: -len(old)] + new in model:
                    name = name[: -len(old)] + new
                    break
        out.setdefault(name, key)
    return out


def prefix_hint(unmatched_model: list[str], unmatched_ckpt: list[str]) -> str:
    """A hint for names that match nowhere: the first of each side, side by side."""
    if not unmatched_model or not unmatched_ckpt:
        return ""
    return (
        f"\nUnmatched model names start like {unmatched_model[0]!r}; unmatched checkpoint names "
        f"like {unmatched_ckpt[0]!r}. If they differ by a prefix or a rename, pass "
        "key_map={'^old_prefix\\.': 'new_prefix.'} (regex → replacement)."
    )
