"""Retry with backoff while the database is briefly away (restart, failover, lock timeout)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import ParamSpec
from typing import TypeVar

from sqlalchemy import exc as sa_exc

_logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Errors that say "the server or the connection is away for now", not "your statement is bad":
# - OperationalError: connection refused/reset, server shutting down or starting up, deadlock,
#   serialization failure, SQLite "database is locked";
# - InterfaceError: the connection was closed under us (psycopg2 after a restart);
# - DisconnectionError: the pool found a dead connection.
_TRANSIENT = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError)

_state = threading.local()


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is a transient database error.

    Optuna wraps SQLAlchemy errors in ``StorageInternalError``; the chain is followed.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _TRANSIENT):
            return True
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


def backoff_delays(max_wait: float, *, first: float = 0.25, cap: float = 5.0) -> list[float]:
    """Exponential delays (``first``, doubling, at most ``cap``) that add up to ``max_wait``."""
    delays: list[float] = []
    delay, total = first, 0.0
    while total < max_wait:
        step = min(delay, cap, max_wait - total)
        delays.append(step)
        total += step
        delay *= 2
    return delays


def call_with_retry(fn: Callable[[], R], *, max_wait: float, what: str) -> R:
    """Call ``fn``; on a transient database error wait and call again, up to ``max_wait`` s.

    Only the outermost call in a thread retries, so nested storage calls do not multiply waits.

    Args:
        fn: The operation; it must be safe to run again after a failure (each Optuna storage
            method opens and commits its own session).
        max_wait: Total seconds of waiting before the last error is raised.
        what: Name of the operation, for the log.

    Returns:
        What ``fn`` returns.
    """
    if getattr(_state, "active", False):
        return fn()
    _state.active = True
    try:
        delays = backoff_delays(max_wait)
        for attempt, delay in enumerate([*delays, None]):
            try:
                return fn()
            except Exception as error:
                if delay is None or not is_transient(error):
                    raise
                if attempt == 0:
                    _logger.warning(
                        "database unavailable during %s (%s); retrying for up to %.0f s",
                        what,
                        type(error).__name__,
                        max_wait,
                    )
                time.sleep(delay)
        raise AssertionError("unreachable")
    finally:
        _state.active = False


def retrying(max_wait_attr: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a storage method so it retries transient errors for ``self.<max_wait_attr>`` s."""

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            max_wait = float(getattr(args[0], max_wait_attr))
            return call_with_retry(
                lambda: method(*args, **kwargs), max_wait=max_wait, what=method.__name__
            )

        return wrapper

    return decorate
