"""When a rank fails, every rank fails, in bounded time, naming it: a rank that raises leaves its
error in the store and closes bigload's groups (the others' waits end at once); a rank that dies
closes them by dying; one that hangs is found by the others' timeouts. The survivors then read
the store, and whoever did not check in is the rank that is gone."""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Iterator

from ..errors import DistributedError, RankFailedError, RankMismatchError
from .group import Group

logger = logging.getLogger(__name__)

GRACE_S = 2.0  # how long survivors wait for a failing rank's message and for each other
_POLL_S = 0.05
_MAX_MESSAGE = 2000


def report(group: Group, err: BaseException) -> None:
    """This rank failed with ``err``: tell the others (through the store) and close the groups."""
    if group.broken:
        return
    text = "".join(traceback.format_exception_only(type(err), err)).strip()[:_MAX_MESSAGE]
    try:
        group.store.set(group.key("failed", group.rank), text)
    except Exception as store_err:  # the store's host is gone: closing the groups still tells
        logger.debug("could not leave the error in the store: %s", store_err)
    group.break_up()


def peer_failure(group: Group, err: BaseException, *, peer: int | None = None) -> RankFailedError:
    """The error a surviving rank raises when a wait on the others failed with ``err``."""
    timed_out = "timed out" in str(err).lower() or "timeout" in str(err).lower()
    found = _failed_rank(group)
    if found is not None:
        group.break_up()
        return RankFailedError(*found)
    missing = _missing_ranks(group)
    group.break_up()
    if missing is None:
        return RankFailedError(0, "it is gone (it hosts the rendezvous store, which no longer "
                                  f"answers); the wait here ended with: {_short(err)}")
    if missing:
        how = (f"did not answer within {group.timeout_s:.0f} s" if timed_out else
               "left without reporting an error (its process ended or was killed)")
        return RankFailedError(missing[0], f"{how}; the wait here ended with: {_short(err)}")
    who = peer if peer is not None else None
    return RankFailedError(who, f"a transfer failed: {_short(err)}")


def _failed_rank(group: Group) -> tuple[int, str] | None:
    """(rank, message) of a rank that reported a failure, waiting up to GRACE_S for one."""
    keys = [group.key("failed", r) for r in range(group.world_size) if r != group.rank]
    deadline = time.monotonic() + GRACE_S
    try:
        while True:
            for r in range(group.world_size):
                if r != group.rank and group.store.check([group.key("failed", r)]):
                    return r, group.store.get(group.key("failed", r)).decode(errors="replace")
            if time.monotonic() > deadline or not keys:
                return None
            time.sleep(_POLL_S)
    except Exception:  # the store is gone
        return None


def _missing_ranks(group: Group) -> list[int] | None:
    """Ranks that did not check in as survivors within GRACE_S; None if the store is gone."""
    try:
        group.store.set(group.key("alive", group.rank), "1")
        deadline = time.monotonic() + GRACE_S
        while True:
            missing = [r for r in range(group.world_size)
                       if not group.store.check([group.key("alive", r)])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(_POLL_S)
    except Exception:
        return None


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:300]


@contextlib.contextmanager
def failing_together(group: Group | None) -> Iterator[None]:
    """Run a block on every rank: if it raises here, the others learn it (and fail with
    RankFailedError naming this rank); a RankFailedError from a wait passes through."""
    if group is None:
        yield
        return
    if group.broken:
        raise DistributedError(
            "this model's ranks failed earlier and the group is closed; load it again")
    try:
        yield
    except RankMismatchError:  # every rank found it, at the same point: the group is fine
        raise
    except RankFailedError:
        group.break_up()
        raise
    except BaseException as err:
        report(group, err)
        raise
