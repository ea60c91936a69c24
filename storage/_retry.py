"""Retry with backoff while the database is briefly away (restart, failover, lock timeout)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import ParamSpec
from typing import TypeVar

from storage._classify import classify

_logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_state = threading.local()


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is a transient database error.

    Outages (connection refused or closed, too many clients, a restart, SQLite's lock) are;
    mistakes (authentication failed, no such database or host, SSL required) and statement
    errors are not (``storage._classify``). Optuna wraps SQLAlchemy errors in
    ``StorageInternalError``; the chain is followed.
    """
    return classify(error) == "transient"


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


def call_with_retry(fn: Callable[[], R], *, max_wait: float, what: str, log: bool = True) -> R:
    """Call ``fn``; on a transient database error wait and call again, up to ``max_wait`` s.

    Only the outermost call in a thread retries, so nested storage calls do not multiply waits.

    Args:
        fn: The operation; it must be safe to run again after a failure (each Optuna storage
            method opens and commits its own session).
        max_wait: Total seconds of waiting before the last error is raised.
        what: Name of the operation, for the log.
        log: Log a warning when the first attempt fails (off where the caller reports the
            outcome itself in one line).

    Returns:
        What ``fn`` returns.
    """
    if getattr(_state, "active", False):
        return fn()
    _state.active = True
    deadline = time.monotonic() + max_wait
    try:
        delays = backoff_delays(max_wait)
        for attempt, delay in enumerate([*delays, None]):
            try:
                return fn()
            except Exception as error:
                # Attempts take time too (a connect timeout): stop at the deadline.
                remaining = deadline - time.monotonic()
                if delay is None or remaining <= 0 or not is_transient(error):
                    raise
                if attempt == 0 and log:
                    _logger.warning(
                        "database unavailable during %s (%s); retrying for up to %.0f s",
                        what,
                        type(error).__name__,
                        max_wait,
                    )
                time.sleep(min(delay, remaining))
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
