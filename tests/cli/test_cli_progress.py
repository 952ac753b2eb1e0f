"""The load bar of ``bigload run``: nothing for a short load, an estimate measured on the load
itself (the instant disk-tier views do not make it optimistic), its line cleared at the end; and
the library hands its byte counts to a bar the caller supplies."""

from __future__ import annotations

import io

import pytest

from bigload.cli.progress import LoadProgress, bar_for
from bigload.report import progress

MB = 1_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_short_load_draws_nothing() -> None:
    clock, out = FakeClock(), io.StringIO()
    bar = LoadProgress(10 * MB, stream=out, clock=clock)
    for _ in range(10):
        clock.now += 0.05
        bar.update(MB)
    bar.close()
    assert out.getvalue() == ""


def test_a_long_load_shows_an_estimate_from_its_own_rate() -> None:
    clock, out = FakeClock(), io.StringIO()
    bar = LoadProgress(100 * MB, stream=out, clock=clock)
    bar.update(50 * MB)  # disk-tier views: placed at once
    for _ in range(5):  # then 1 MB per 0.2 s read from the file: 5 MB/s
        clock.now += 0.2
        bar.update(MB)
    assert out.getvalue() == ""  # one second in: nothing yet
    clock.now += 0.2
    bar.update(MB)
    line = out.getvalue().rsplit("\r\033[K", 1)[-1]
    # armed at 0.6 s (53 MB placed); at 1.2 s: 3 MB in 0.6 s = 5 MB/s, 44 MB left = 8.8 s (the
    # rate from the start, 56 MB in 1.2 s, would say 0.9 s)
    assert line == "loading: 53.4 MiB of 95.4 MiB (56%), 4.8 MiB/s, about 9 s left"
    bar.close()
    assert out.getvalue().endswith("\r\033[K")


def test_no_bar_when_little_is_left() -> None:
    clock, out = FakeClock(), io.StringIO()
    bar = LoadProgress(100 * MB, stream=out, clock=clock)
    for _ in range(12):  # 8 MB per 0.1 s: done in 1.25 s, never 2 s left after the first second
        clock.now += 0.1
        bar.update(8 * MB)
    assert out.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_is_drawn_on_a_terminal_only() -> None:
    assert bar_for(io.StringIO()) is False
    factory = bar_for(_Terminal())
    assert isinstance(factory(10), LoadProgress)


def test_the_library_counts_bytes_into_the_callers_bar() -> None:
    seen: list[object] = []

    class Bar:
        def update(self, n: int) -> None:
            seen.append(n)

        def close(self) -> None:
            seen.append("closed")

    def factory(total: int) -> Bar:
        seen.append(("total", total))
        return Bar()

    with progress(factory, 30) as bar:
        bar.update(10)
        bar.update(20)
    assert seen == [("total", 30), 10, 20, "closed"]


@pytest.mark.parametrize("enabled", [False, None])
def test_no_bar_unless_asked_off_a_terminal(enabled: bool | None) -> None:
    with progress(enabled, 10) as bar:  # pytest's stderr is not a terminal
        bar.update(10)
