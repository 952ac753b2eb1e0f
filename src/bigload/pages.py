"""Page advice on a memory-mapped byte range: the one place that rounds a tensor's byte range
to pages and calls ``madvise``."""

from __future__ import annotations

import mmap

PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux >= 5.14: map the pages now (fault them in)


def page_span(byte_range: tuple[int, int] | None) -> tuple[int, int] | None:
    """``(start, length)`` of the pages covering ``byte_range``, or None when it is empty."""
    start, end = byte_range or (0, 0)
    if end <= start:
        return None
    first = (start // PAGE) * PAGE
    return first, end - first


def inner_span(byte_range: tuple[int, int] | None) -> tuple[int, int] | None:
    """``(start, length)`` of the pages that lie wholly inside ``byte_range``: dropping them
    cannot touch a neighbouring tensor's bytes (an edited private page, say)."""
    start, end = byte_range or (0, 0)
    first, last = -(-start // PAGE) * PAGE, (end // PAGE) * PAGE
    return (first, last - first) if last > first else None


def advise(mm: mmap.mmap | None, byte_range: tuple[int, int] | None, *advice: int) -> bool:
    """Apply the first of ``advice`` the kernel accepts to the pages of ``byte_range`` of
    ``mm``; False when none was accepted (or there is nothing to advise). Dropping pages
    (``MADV_DONTNEED``) only touches pages wholly inside the range."""
    span = inner_span(byte_range) if mmap.MADV_DONTNEED in advice else page_span(byte_range)
    if mm is None or span is None:
        return False
    for value in advice:
        try:
            mm.madvise(value, *span)
            return True
        except OSError:
            continue
    return False
