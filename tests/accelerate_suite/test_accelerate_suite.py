"""accelerate's own big-model tests (test_big_modeling, test_modeling_utils, test_offload,
test_hooks from the sdist of the installed accelerate) run against bigload's functions.

Every test that calls a function bigload offers must pass, except those listed with a reason in
``expected_failures.toml``; a listed test that passes fails this test too, so the list stays
honest. The files are downloaded on first use (cached, see ``accelerate_harness``); without
network set ``BIGLOAD_ACCELERATE_TESTS`` to a folder holding them. A failed download fails.
"""

from __future__ import annotations

import accelerate_harness as harness
import pytest

pytest.importorskip("accelerate")


def _summary(**tests: dict) -> dict:
    base = {"counted": True, "failures": [], "control_outcome": None}
    return {"scope": "public", "accelerate_version": "x",
            "tests": {name: {**base, **fields} for name, fields in tests.items()}}


def _expected(*names: str) -> dict[str, harness.Expected]:
    return {n: harness.Expected(n, "deliberate", "because") for n in names}


# --- the judge, on made-up results ------------------------------------------------------------
def test_judge_accepts_listed_failures_and_ignores_uncounted_tests():
    summary = _summary(a={"outcome": "passed"}, b={"outcome": "failed"},
                       c={"outcome": "failed", "counted": False}, d={"outcome": "skipped"})
    verdict = harness.judge(summary, _expected("b", "d"))
    assert verdict.ok
    assert verdict.not_run == ["d"]
    assert verdict.counts["expected_failures"] == 1


def test_judge_flags_new_failures_and_listed_tests_that_pass():
    summary = _summary(a={"outcome": "failed"}, b={"outcome": "passed"}, c={"outcome": "error"})
    verdict = harness.judge(summary, _expected("b", "gone"))
    assert not verdict.ok
    assert verdict.unexpected_failures == ["a", "c"]
    assert verdict.unexpected_passes == ["b"]
    assert verdict.unknown_entries == ["gone"]
    report = harness.explain(verdict, summary)
    assert "UNEXPECTED FAILURE a" in report and "NOW PASSES" in report and "gone" in report


def test_judge_sets_aside_tests_that_fail_under_accelerate_too():
    summary = _summary(a={"outcome": "failed", "control_outcome": "failed"})
    verdict = harness.judge(summary, {})
    assert verdict.ok
    assert verdict.environment_failures == ["a"]


def test_expected_failures_table_is_well_formed():
    entries = harness.load_expected()
    assert entries
    assert {e.category for e in entries.values()} <= set(harness.CATEGORIES)
    assert all(e.test.split("::")[0] in harness.TEST_FILES for e in entries.values())


def test_a_folder_without_the_files_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(harness.ENV_TESTS, str(tmp_path))
    with pytest.raises(harness.HarnessError, match="does not hold"):
        harness.locate_tests()


# --- the real run -----------------------------------------------------------------------------
def test_accelerate_big_model_tests_pass_against_bigload(tmp_path):
    expected = harness.load_expected()
    summary = harness.run_suite(harness.locate_tests(), workdir=tmp_path, known=set(expected))
    verdict = harness.judge(summary, expected)
    assert verdict.counts["counted"] > 0, harness.explain(verdict, summary)
    assert verdict.ok, harness.explain(verdict, summary)
