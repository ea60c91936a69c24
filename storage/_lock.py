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

A lock that can expire protects nothing by itself: the budget's claim also fences its writes
(``storage._fence``), so a holder that lost the lock while paused writes nothing when it
resumes. Every PostgreSQL connection of a process bounds its idle transactions the same way
(``idle_in_transaction_session_timeout``, set by ``storage._create``): a holder paused in the
middle of any transaction (its row locks would stall the next holder) is cut off too. The
lock's connection is named after its holder (``application_name`` ``search <pid>@<host>``;
through ``search proxy``, the worker's), so ``pg_locks`` joined with ``pg_stat_activity`` says
which process holds it (:func:`advisory_holder`).

The startup lock (:func:`take_startup_lock`, serialising table creation) is held the same way;
a command waiting for it names the holder on stderr after ``STARTUP_REPORT_S`` seconds and gives
up with one line once one holder has kept it past ``$SEARCH_LOCK_TIMEOUT`` plus
``STARTUP_SLACK_S``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy
from filelock import FileLock
from optuna.storages import BaseStorage

from storage._classify import sqlstate
from storage._error import StorageError
from storage._retry import call_with_retry
from storage._url import sqlite_file
from storage.compat import rdb_backend

_logger = logging.getLogger(__name__)

ENV_LOCK_TIMEOUT = "SEARCH_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 60.0
STARTUP_REPORT_S = 3.0  # a command waiting this long for the startup lock names its holder
STARTUP_SLACK_S = 2.0  # ... and gives up when one holder keeps it this long past the timeout
_LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock wait cut by lock_timeout

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


def idle_timeout_ms() -> int:
    """``$SEARCH_LOCK_TIMEOUT`` in milliseconds, for ``idle_in_transaction_session_timeout``."""
    return max(1, int(lock_timeout() * 1000))


def holder_label(holder: str | None = None) -> str:
    """The ``application_name`` of a lock's connection: ``search <pid>@<host>`` of this process,
    or of ``holder`` (a worker's ``<pid>@<host>``, for ``search proxy``); at most 63 bytes."""
    who = holder or f"{os.getpid()}@{socket.gethostname()}"
    return f"search {who}".encode()[:63].decode(errors="ignore")


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock`` from a lock name."""
    digest = hashlib.blake2b(f"search:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def sqlite_lock_path(engine: sqlalchemy.engine.Engine) -> str | None:
    """``<database file>.lock`` for an SQLite file engine; ``None`` for in-memory SQLite."""
    database = sqlite_file(engine.url)
    return f"{database}.lock" if database is not None else None


@contextmanager
def named_lock(
    storage: BaseStorage, name: str, *, max_wait: float = 120.0, holder: str | None = None
) -> Iterator[None]:
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
        holder: Who the lock is taken for (``<pid>@<host>``; ``search proxy`` passes its
            worker's), shown as the PostgreSQL connection's ``application_name``.
    """
    hold_lock = getattr(storage, "hold_lock", None)
    if hold_lock is not None:  # a search proxy takes the lock on its database for us
        with hold_lock(name):
            yield
        return
    rdb = rdb_backend(storage)
    if rdb is not None and rdb.engine.dialect.name == "postgresql":
        with _pg_lock(rdb.engine, name, max_wait, holder_label(holder)):
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
def _pg_lock(
    engine: sqlalchemy.engine.Engine, name: str, max_wait: float, label: str
) -> Iterator[None]:
    key = lock_key(name)

    def acquire() -> sqlalchemy.engine.Connection:
        conn = engine.connect()
        try:
            conn.begin()
            _name_holder(conn, label)
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


def _name_holder(conn: sqlalchemy.engine.Connection, label: str) -> None:
    """In the lock's transaction: its silence is bounded (waiting for the lock is "active", not
    idle: only a holder's silence counts) and its connection named after the holder."""
    conn.execute(
        sqlalchemy.text(f"SET LOCAL idle_in_transaction_session_timeout = {idle_timeout_ms()}")
    )
    conn.execute(sqlalchemy.select(sqlalchemy.func.set_config("application_name", label, True)))


def advisory_holder(conn: sqlalchemy.engine.Connection, key: int) -> tuple[str, float] | None:
    """Who holds the advisory lock ``key`` in this database, and for how many seconds.

    From ``pg_locks`` joined with ``pg_stat_activity``: the backend's pid, its
    ``application_name`` (``search <pid>@<host>`` names the client process) and client address;
    the seconds since its last statement (a holder's last is taking the lock). ``None`` when
    nobody holds it (any more).
    """
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF  # pg_locks: high word classid, low word objid
    row = conn.execute(
        sqlalchemy.text(
            "SELECT a.pid, a.application_name, host(a.client_addr), a.client_port,"
            " extract(epoch FROM now() - a.state_change)"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid::bigint = :high AND l.objid::bigint = :low"
        ),
        {"high": unsigned >> 32, "low": unsigned & 0xFFFF_FFFF},
    ).first()
    if row is None:
        return None
    pid, app, addr, port, held = row
    where = f"{addr}:{port}" if addr else "a local socket"
    return f"server pid {pid} ({app or 'no application_name'}, from {where})", float(held or 0)


def take_startup_lock(conn: sqlalchemy.engine.Connection, key: int, what: str) -> None:
    """Take the advisory lock ``key`` in a new transaction of ``conn`` and keep it until the
    transaction ends; the server ends it once its holder is silent for ``$SEARCH_LOCK_TIMEOUT``.

    While waiting: after ``STARTUP_REPORT_S`` seconds, one line on stderr (a warning) naming the
    holder; once one holder has kept it longer than ``$SEARCH_LOCK_TIMEOUT`` plus
    ``STARTUP_SLACK_S`` (it is working, not silent, or does not bound its silence), a
    :class:`StorageError` naming it.

    Args:
        conn: A connection with no transaction.
        key: The lock's key (:func:`lock_key`).
        what: The lock, for the messages (``the startup lock of <url>``).
    """
    started = time.monotonic()
    reported = False
    give_up = lock_timeout() + STARTUP_SLACK_S
    while True:
        conn.begin()
        _name_holder(conn, holder_label())
        waited = time.monotonic() - started
        step = (STARTUP_REPORT_S - waited) if not reported else 1.0
        conn.execute(sqlalchemy.text(f"SET LOCAL lock_timeout = {max(50, int(step * 1000))}"))
        try:
            conn.execute(sqlalchemy.select(sqlalchemy.func.pg_advisory_xact_lock(key)))
        except sqlalchemy.exc.DBAPIError as error:
            if sqlstate(error) != _LOCK_NOT_AVAILABLE:
                raise
            conn.rollback()
        else:
            conn.execute(sqlalchemy.text("SET LOCAL lock_timeout = 0"))
            return
        found = advisory_holder(conn, key)
        conn.rollback()
        if found is None:
            continue  # released just now
        who, held = found
        if held > give_up:
            raise StorageError(
                f"{what} has been held for {held:.0f} s by {who}, longer than "
                f"${ENV_LOCK_TIMEOUT}={lock_timeout():g} s: stop or end that process, or try "
                f"again"
            )
        if not reported and time.monotonic() - started >= STARTUP_REPORT_S:
            _logger.warning(
                "waiting for %s, held by %s for %.0f s (released when it ends, or after $%s=%g "
                "s of its silence)",
                what,
                who,
                held,
                ENV_LOCK_TIMEOUT,
                lock_timeout(),
            )
            reported = True
