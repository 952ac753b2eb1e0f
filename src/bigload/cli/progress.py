"""The bar ``bigload run`` draws on stderr while tensors are placed — only when the load is long,
and with an estimate measured on this load: bytes placed per second since the bar was armed.

The library counts bytes (``bigload.load(progress=factory)`` hands ``factory(total_bytes)`` an
``update(n)`` per tensor); drawing is the CLI's. Disk-tier tensors served from the checkpoint are
placed almost at once, so the rate is measured from ``ARM_S`` on, not from the start.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from bigload.devices import format_size

SHOW_AFTER_S = 1.0  # a load shorter than this draws nothing
ARM_S = 0.5  # the rate is measured from here on
MIN_LEFT_S = 2.0  # not worth a bar when this little is left
REDRAW_S = 0.2


class LoadProgress:
    """``update(n)`` per placed tensor, ``close()`` at the end (clears its line)."""

    def __init__(self, total_bytes: int, *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total_bytes
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.start = clock()
        self.armed: tuple[float, int] | None = None  # (time, bytes done) when the rate starts
        self.shown = False
        self.drawn_at = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        elapsed = now - self.start
        if self.armed is None and elapsed >= ARM_S:
            self.armed = (now, self.done)
        left = self.seconds_left(now)
        if not self.shown and (elapsed < SHOW_AFTER_S or left is None or left < MIN_LEFT_S):
            return
        if now - self.drawn_at >= REDRAW_S or self.done >= self.total:
            self.draw(left)
            self.drawn_at = now

    def rate(self, now: float) -> float | None:
        """Bytes per second since the bar was armed (None until there is something to go on)."""
        if self.armed is None or now - self.armed[0] < ARM_S:
            return None
        placed = self.done - self.armed[1]
        return placed / (now - self.armed[0]) if placed > 0 else None

    def seconds_left(self, now: float) -> float | None:
        rate = self.rate(now)
        return None if rate is None else max(0, self.total - self.done) / rate

    def line(self, left: float | None) -> str:
        share = self.done / self.total if self.total else 1.0
        estimate = "estimating" if left is None else f"about {_seconds(left)} left"
        rate = self.rate(self.clock())
        speed = f", {format_size(rate)}/s" if rate else ""
        return (f"loading: {format_size(self.done)} of {format_size(self.total)} "
                f"({share:.0%}){speed}, {estimate}")

    def draw(self, left: float | None) -> None:
        self.shown = True
        self.stream.write("\r\033[K" + self.line(left))
        self.stream.flush()

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.0f} s"
    minutes, seconds = divmod(int(value), 60)
    return f"{minutes} min {seconds:02d} s"


def bar_for(stream: TextIO) -> Callable[[int], LoadProgress] | bool:
    """What ``bigload run`` passes as ``progress=``: its own bar when ``stream`` is a terminal,
    else none (no library bar either)."""
    isatty = getattr(stream, "isatty", None)
    if isatty is None or not isatty():
        return False
    return lambda total: LoadProgress(total, stream=stream)
