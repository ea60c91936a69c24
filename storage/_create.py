"""Turn a storage URL into an Optuna storage tuned for one laptop or many GPU workers."""

from __future__ import annotations

import logging
import os
import sqlite3
import warnings
from contextlib import AbstractContextManager
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import sqlalchemy
from filelock import FileLock
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage
from optuna.storages import RetryHeartbeatStaleTrialCallback
from sqlalchemy.engine import make_url

from storage._engine import PG_CONNECT_TIMEOUT_S
from storage._engine import check_driver
from storage._engine import connect_timeout
from storage._engine import first_connection
from storage._engine import unreachable
from storage._error import StorageError
from storage._lock import idle_timeout_ms
from storage._lock import lock_key
from storage._lock import take_startup_lock
from storage._rdb import ResilientRDBStorage
from storage._retry import call_with_retry
from storage._url import is_proxy_url
from storage._url import normalize_url
from storage._url import parse_url
from storage._url import redact_url

_logger = logging.getLogger(__name__)

# PostgreSQL, per worker process: the main thread, the heartbeat thread and the budget lock
# each hold a connection at times; 4 + 4 overflow leaves room and keeps 25 workers under the
# server's default max_connections=100 even in the worst case.
PG_POOL_SIZE = 4
PG_MAX_OVERFLOW = 4
PG_POOL_RECYCLE_S = 1800  # drop connections older than this (proxies and NATs cut idle ones)
SQLITE_BUSY_TIMEOUT_S = 60  # wait this long for another process's write lock
# Operators tune heartbeats without code: these replace a (non-None) heartbeat_interval and
# the grace period given to create_storage, e.g. in docker-compose's environment.
ENV_HEARTBEAT_INTERVAL = "SEARCH_HEARTBEAT_INTERVAL"
ENV_GRACE_PERIOD = "SEARCH_GRACE_PERIOD"
SCHEMA_LOCK = "schema"  # advisory lock name serialising table creation on a fresh database


def engine_kwargs_for(backend: str) -> dict[str, Any]:
    """``sqlalchemy.create_engine`` keyword arguments for one backend.

    Args:
        backend: ``postgresql``, ``sqlite`` or another SQLAlchemy backend name.

    Returns:
        PostgreSQL: ``pool_pre_ping`` (Optuna sets it only for MySQL), pool sizes for many
        workers, a connect timeout and TCP keepalives. SQLite: a busy timeout. Others: ``{}``.
    """
    if backend == "postgresql":
        return {
            "pool_pre_ping": True,
            "pool_size": PG_POOL_SIZE,
            "max_overflow": PG_MAX_OVERFLOW,
            "pool_recycle": PG_POOL_RECYCLE_S,
            "connect_args": {
                "connect_timeout": PG_CONNECT_TIMEOUT_S,
                "application_name": "search",
                "keepalives": 1,
                "keepalives_idle": 30,
                "keepalives_interval": 10,
                "keepalives_count": 3,
            },
        }
    if backend == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    return {}


def create_storage(
    url: str,
    *,
    heartbeat_interval: int | None = 30,
    grace_period: int | None = None,
    max_retry: int = 3,
    max_wait: float = 120.0,
    must_exist: bool = False,
    pool: tuple[int, int] | None = None,
) -> BaseStorage:
    """An Optuna storage for ``url``: PostgreSQL for teams, an SQLite file by default.

    ``grpc://host:port`` is a ``search proxy`` in front of the database
    (``storage._proxy_client.ProxyStorage``, heartbeats and the budget's operations run by
    the proxy); an unreachable proxy is a ``StorageUnreachable`` after
    ``$SEARCH_CONNECT_TIMEOUT`` seconds.

    Both are a :class:`ResilientRDBStorage` with heartbeats: a trial whose worker stops
    beating for ``grace_period`` seconds is failed by the next worker that claims a trial, and
    ``RetryHeartbeatStaleTrialCallback`` re-queues its parameters up to ``max_retry`` times.
    PostgreSQL gets ``pool_pre_ping`` and pool sizes for many workers; SQLite gets a busy
    timeout and WAL journaling (readers do not block the writer). Creating the tables of a
    fresh database is serialised across processes, so ten workers can start at once.

    The first connection waits at most ``$SEARCH_CONNECT_TIMEOUT`` seconds (20) for a server
    that is away; a mistake (no such database, host or role, authentication failed, SSL
    required, a missing driver) is raised at once.

    Example:
        >>> s = create_storage("sqlite:///:memory:", heartbeat_interval=None)
        >>> type(s).__name__
        'ResilientRDBStorage'

    Args:
        url: SQLAlchemy URL (``postgresql://user:pass@host/db``, ``sqlite:///f.db``).
        heartbeat_interval: Seconds between heartbeats of a running trial; ``None`` disables
            heartbeats (reports, read-only use). ``$SEARCH_HEARTBEAT_INTERVAL`` replaces a
            value that is not ``None``.
        grace_period: Seconds without a heartbeat after which a trial is stale; default
            ``2 * heartbeat_interval``. ``$SEARCH_GRACE_PERIOD`` replaces it when heartbeats
            are on.
        max_retry: How many times a stale trial's parameters are re-queued.
        max_wait: Seconds to wait for a database that is briefly away, per call once
            connected.
        must_exist: For read-only commands: a missing SQLite file is a ``StorageError``, and
            nothing (neither the file nor its lock) is created.
        pool: PostgreSQL's ``(pool_size, max_overflow)`` instead of the worker's (4, 4):
            ``search proxy`` serves many workers from one pool.

    Returns:
        The storage (pass it to ``optuna.create_study`` / ``load_study``).

    Raises:
        StorageError: Bad URL, missing driver, unreachable database or an old schema; the
            message is one line with the password redacted.
    """
    url = normalize_url(url)
    shown = redact_url(url)
    if heartbeat_interval is not None:
        heartbeat_interval = _env_int(ENV_HEARTBEAT_INTERVAL, heartbeat_interval)
        grace_period = _env_int(ENV_GRACE_PERIOD, grace_period)
    if heartbeat_interval is not None and heartbeat_interval <= 0:
        raise ValueError(f"heartbeat_interval must be > 0, but got {heartbeat_interval=}.")
    if grace_period is not None and grace_period <= 0:
        raise ValueError(f"grace_period must be > 0, but got {grace_period=}.")
    if max_retry < 0:
        raise ValueError(f"max_retry must be >= 0, but got {max_retry=}.")
    if is_proxy_url(url):
        return _proxy_client(url, heartbeat_interval, grace_period, max_retry)
    backend, path = parse_url(url)
    check_driver(url)
    kwargs = engine_kwargs_for(backend)
    if backend == "postgresql":
        if pool is not None:
            kwargs["pool_size"], kwargs["max_overflow"] = pool
        kwargs["connect_args"]["options"] = bounded_idle_options(url)
    if path is not None:
        check_sqlite_path(path, shown, must_exist=must_exist)
    # A read-only command on an existing SQLite file writes nothing: no WAL switch, no lock.
    read_only = must_exist and backend == "sqlite"
    with nullcontext() if read_only else _schema_lock(url, backend, path, kwargs, max_wait, shown):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                callback = (
                    RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
                    if heartbeat_interval is not None
                    else None
                )
                storage = call_with_retry(  # another client may take the last slot now
                    lambda: ResilientRDBStorage(
                        url,
                        kwargs,
                        max_wait=max_wait,
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period,
                        heartbeat_stale_trial_callback=callback,
                    ),
                    max_wait=connect_timeout(),
                    what="open",
                    log=False,
                )
        except RuntimeError as exc:  # Optuna: the schema is older than this Optuna
            if "compatible with the table schema" not in str(exc):
                raise
            raise StorageError(
                f"the schema of {shown} is older than this Optuna's: run "
                f"`search storage check --storage URL --upgrade` (back up the database first)"
            ) from None
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise unreachable(url, exc, None) from None
    _logger.info("storage %s (heartbeat %s s)", shown, heartbeat_interval)
    return storage


def bounded_idle_options(url: str) -> str:
    """libpq ``options`` (the URL's own kept) that make the server end any transaction of this
    process left idle for ``$SEARCH_LOCK_TIMEOUT``.

    A process paused (SIGSTOP, a VM pause) or cut off in the middle of a transaction keeps its
    row locks (the study's row, taken by every trial creation): without this, every other
    worker would wait for it as long as it stays paused, lock timeout or not. A transaction of
    this project is never idle for long (each is a few statements in a row).
    """
    given = make_url(url).query.get("options")
    setting = f"-c idle_in_transaction_session_timeout={idle_timeout_ms()}"
    return f"{given} {setting}" if isinstance(given, str) and given else setting


def _proxy_client(
    url: str, heartbeat_interval: int | None, grace_period: int | None, max_retry: int
) -> BaseStorage:
    """The client of a ``search proxy`` at ``url`` (it has answered)."""
    from storage._proxy_client import ProxyStorage  # imports grpc: only for grpc:// URLs

    storage = ProxyStorage(
        url,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        max_retry=max_retry,
        timeout=connect_timeout(),
    )
    _logger.info("storage %s via %s (heartbeat %s s)", storage.server.get("storage"), url,
                 heartbeat_interval)  # fmt: skip
    return storage


def _env_int(name: str, value: int | None) -> int | None:
    """``$name`` as an int > 0 if set (another value is a StorageError), else ``value``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return value
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number <= 0:
        raise StorageError(f"${name} must be a whole number of seconds > 0, not {text!r}")
    return number


def check_heartbeat_env() -> None:
    """Raise the StorageError a bad ``$SEARCH_HEARTBEAT_INTERVAL`` / ``$SEARCH_GRACE_PERIOD``
    would raise in ``create_storage`` (the CLI asks before any work)."""
    _env_int(ENV_HEARTBEAT_INTERVAL, None)
    _env_int(ENV_GRACE_PERIOD, None)


def check_new_sqlite(url: str) -> None:
    """Raise the StorageError ``create_storage`` would raise for an SQLite file it is to create
    in a directory that does not exist (the CLI asks before any work; nothing is opened)."""
    if is_proxy_url(url):
        return
    backend, path = parse_url(url)
    if backend == "sqlite" and path is not None:
        check_sqlite_path(path, redact_url(url), must_exist=False)


def check_sqlite_path(path: str, shown: str, *, must_exist: bool) -> None:
    """An SQLite file's directory must exist, and with ``must_exist`` the file itself."""
    file = Path(path)
    if not file.parent.is_dir():
        raise StorageError(f"cannot open {shown}: directory {file.parent} does not exist")
    if must_exist and not file.is_file():
        raise StorageError(
            f"no database file {file} (storage {shown}): this command creates nothing; "
            f"check --storage or $SEARCH_STORAGE"
        )


def _schema_lock(
    url: str, backend: str, path: str | None, kwargs: dict[str, Any], max_wait: float, shown: str
) -> AbstractContextManager[Any]:
    """Wait for the database (``$SEARCH_CONNECT_TIMEOUT``), then lock out other table creators."""
    if backend == "sqlite":
        if path is None:
            return nullcontext()
        _prepare_sqlite(path, shown)
        return FileLock(f"{path}.lock")
    if backend == "postgresql":
        return _PgSchemaLock(url, kwargs, max_wait, shown)
    return nullcontext()


def _prepare_sqlite(path: str, shown: str) -> None:
    """Switch the file to WAL journaling (persistent in the file), creating it if needed."""
    try:
        with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open {shown}: {exc}") from None


class _PgSchemaLock(AbstractContextManager["_PgSchemaLock"]):
    """Connect (waiting ``$SEARCH_CONNECT_TIMEOUT`` for a server that is away) and hold the
    startup advisory lock, bounded like the budget lock (``storage._lock.take_startup_lock``)."""

    def __init__(self, url: str, kwargs: dict[str, Any], max_wait: float, shown: str) -> None:
        self._url = url
        self._connect_args = kwargs.get("connect_args", {})
        self._max_wait = max_wait
        self._shown = shown
        self._engine: sqlalchemy.engine.Engine | None = None
        self._conn: sqlalchemy.engine.Connection | None = None

    def __enter__(self) -> _PgSchemaLock:
        key = lock_key(SCHEMA_LOCK)
        engine = self._engine = first_connection(self._url, self._connect_args)
        what = f"the startup lock of {self._shown}"

        def connect() -> sqlalchemy.engine.Connection:
            conn = engine.connect()
            try:
                take_startup_lock(conn, key, what)  # bounded: storage._lock
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            self._conn = call_with_retry(connect, max_wait=self._max_wait, what="connect")
        except sqlalchemy.exc.SQLAlchemyError as exc:
            engine.dispose()
            raise unreachable(self._url, exc, None) from None
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._conn is not None:
                self._conn.close()  # ending its transaction releases the advisory lock
        except sqlalchemy.exc.SQLAlchemyError as error:  # cut off: the server released it
            _logger.warning(
                "the startup lock's connection was lost while held (%s): held past "
                "$SEARCH_LOCK_TIMEOUT, or the database restarted",
                type(error).__name__,
            )
        finally:
            if self._engine is not None:
                self._engine.dispose()
