"""Named locks shared by every process that uses one storage.

PostgreSQL: a transaction-level advisory lock (``pg_advisory_xact_lock``) taken on a connection
of its own, so it is released by the server if the process dies. The lock's transaction sits
idle while its holder works on other connections; ``idle_in_transaction_session_timeout``
(``$SEARCH_LOCK_TIMEOUT``, default 60 s) makes the server end it, and so release the lock, when
the holder is paused (SIGSTOP, a VM pause) or cut off by a network partition the server cannot
see: without it every other worker would wait until the holder came back. A holder that is only
slow must finish within that time (the budget's critical section takes well under a second).
SQLite: an exclusive file lock next to the database file (``<file>.lock``). Through ``search
proxy`` (``grpc://``): the proxy takes the lock on its database for the worker and holds it
while the worker's lock call is open (``storage._proxy_client``). Anything else
(in-memory storages): a lock within this process only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy
from filelock import FileLock
from optuna.storages import BaseStorage

from storage._error import StorageError
from storage._retry import call_with_retry
from storage._url import sqlite_file
from storage.compat import rdb_backend

_logger = logging.getLogger(__name__)

ENV_LOCK_TIMEOUT = "SEARCH_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 60.0

_process_locks: dict[str, threading.RLock] = {}
_file_locks: dict[str, FileLock] = {}
_guard = threading.Lock()


def lock_timeout() -> float:
    """Seconds a PostgreSQL lock may sit idle before the server releases it."""
    text = os.environ.get(ENV_LOCK_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise StorageError(
            f"${ENV_LOCK_TIMEOUT} must be a positive number of seconds, not {text!r}"
        )
    return value


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock`` from a lock name."""
    digest = hashlib.blake2b(f"search:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def sqlite_lock_path(engine: sqlalchemy.engine.Engine) -> str | None:
    """``<database file>.lock`` for an SQLite file engine; ``None`` for in-memory SQLite."""
    database = sqlite_file(engine.url)
    return f"{database}.lock" if database is not None else None


@contextmanager
def named_lock(storage: BaseStorage, name: str, *, max_wait: float = 120.0) -> Iterator[None]:
    """Hold the lock ``name`` across all processes and machines that share ``storage``.

    Re-entrant within one thread for SQLite and process locks; on PostgreSQL the same name
    must not be taken twice by one thread (different names are independent).

    Example:
        >>> import optuna
        >>> with named_lock(optuna.storages.InMemoryStorage(), "budget:0"):
        ...     pass

    Args:
        storage: The study's storage (an ``RDBStorage``, possibly wrapped by Optuna's cache).
        name: What is locked, e.g. ``budget:<study id>``.
        max_wait: Seconds to retry taking the lock while the database is briefly away.
    """
    hold_lock = getattr(storage, "hold_lock", None)
    if hold_lock is not None:  # a search proxy takes the lock on its database for us
        with hold_lock(name):
            yield
        return
    rdb = rdb_backend(storage)
    if rdb is not None and rdb.engine.dialect.name == "postgresql":
        with _pg_lock(rdb.engine, name, max_wait):
            yield
        return
    path = sqlite_lock_path(rdb.engine) if rdb is not None else None
    if path is not None:
        with _guard:
            file_lock = _file_locks.setdefault(path, FileLock(path))
        with file_lock:
            yield
        return
    with _guard:
        lock = _process_locks.setdefault(name, threading.RLock())
    with lock:
        yield


@contextmanager
def _pg_lock(engine: sqlalchemy.engine.Engine, name: str, max_wait: float) -> Iterator[None]:
    key = lock_key(name)
    idle_ms = int(lock_timeout() * 1000)

    def acquire() -> sqlalchemy.engine.Connection:
        conn = engine.connect()
        try:
            conn.begin()
            # Waiting for the lock is "active", not idle: only a holder's silence counts.
            conn.execute(
                sqlalchemy.text(f"SET LOCAL idle_in_transaction_session_timeout = {idle_ms}")
            )
            conn.execute(sqlalchemy.select(sqlalchemy.func.pg_advisory_xact_lock(key)))
        except BaseException:
            conn.close()
            raise
        return conn

    conn = call_with_retry(acquire, max_wait=max_wait, what=f"lock {name}")
    try:
        yield
    finally:
        # Ending the transaction releases the lock; if the connection died, the server has
        # released it already.
        try:
            conn.rollback()
        except Exception as error:
            _logger.warning(
                "lock %s: its connection was lost while held (%s); the server had released it "
                "(held past $%s=%g s, or the database restarted)",
                name,
                type(error).__name__,
                ENV_LOCK_TIMEOUT,
                lock_timeout(),
            )
        finally:
            conn.close()
