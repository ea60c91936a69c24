"""Engines: the driver behind a URL, connect timeouts, and a first connection that fails fast.

``postgresql://`` and ``postgresql+psycopg://`` use psycopg 3 (the project's driver);
``postgresql+psycopg2://`` works where psycopg2 is installed. A missing driver is a one-line
``StorageError`` that names the package to install.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from storage._classify import classify
from storage._error import StorageError
from storage._error import StorageUnreachable
from storage._retry import call_with_retry
from storage._url import redact_url
from storage._url import scrub

# How long a command waits for an unreachable server before it says so (seconds, in all).
ENV_CONNECT_TIMEOUT = "SEARCH_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT_S = 20.0  # with start-up and a last attempt: reported within 30 s
PG_CONNECT_TIMEOUT_S = 10  # one connection attempt (libpq connect_timeout; at least 2)

# Driver module -> what to pip install.
_DRIVER_PACKAGES = {
    "psycopg": "'psycopg[binary]'",
    "psycopg2": "psycopg2-binary",
    "pymysql": "pymysql",
    "MySQLdb": "mysqlclient",
    "asyncpg": "asyncpg",
    "pg8000": "pg8000",
}


def connect_timeout() -> float:
    """Seconds a command waits for an unreachable server (``$SEARCH_CONNECT_TIMEOUT``, 20).

    Example:
        >>> connect_timeout() > 0
        True
    """
    text = os.environ.get(ENV_CONNECT_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise StorageError(f"${ENV_CONNECT_TIMEOUT} must be a number of seconds > 0, not {text!r}")
    return value


def check_driver(url: str) -> None:
    """Raise a one-line ``StorageError`` if the URL's dialect or driver is not available.

    Example:
        >>> check_driver("sqlite:///:memory:")
    """
    shown = redact_url(url)
    try:
        dialect = make_url(url).get_dialect()
    except sqlalchemy.exc.NoSuchModuleError:
        scheme = url.partition("://")[0]
        raise StorageError(
            f"bad storage URL {shown!r}: unknown database {scheme!r} "
            f"(use postgresql://... or sqlite:///file.db)"
        ) from None
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise StorageError(f"bad storage URL {shown!r}: cannot parse it") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise missing_driver(url, exc) from None


def missing_driver(url: str, error: ImportError) -> StorageError:
    """The error for a URL whose driver module cannot be imported."""
    module = (error.name or "").split(".")[0] or str(error)
    package = _DRIVER_PACKAGES.get(module, module)
    hint = ""
    if module == "psycopg2":
        hint = " (or write postgresql://..., which uses psycopg 3, installed with search)"
    return StorageError(
        f"{redact_url(url)} needs the {module} driver, which is not installed: "
        f"pip install {package}{hint}"
    )


def make_engine(url: str, **kwargs: Any) -> sqlalchemy.engine.Engine:
    """``sqlalchemy.create_engine`` with a missing driver as a one-line ``StorageError``."""
    try:
        return sqlalchemy.create_engine(url, **kwargs)
    except ImportError as exc:
        raise missing_driver(url, exc) from None
    except sqlalchemy.exc.ArgumentError as exc:
        reason = scrub(str(exc), url)
        raise StorageError(f"bad storage URL {redact_url(url)!r}: {reason}") from None


def one_line(error: BaseException, url: str) -> str:
    """The driver's first line for ``error`` (not SQLAlchemy's wrapper), secrets scrubbed."""
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.orig is not None:
        error = error.orig
    lines = [" ".join(line.split()) for line in str(error).strip().splitlines()]
    text = next((line for line in lines if line), type(error).__name__)
    return scrub(text.removeprefix("connection failed: "), url)


def unreachable(url: str, error: BaseException, waited: float | None) -> StorageError:
    """The one-line error for a first connection that failed (permanently or for too long)."""
    shown = redact_url(url)
    reason = one_line(error, url)
    if classify(error) == "transient" and waited is not None:
        return StorageUnreachable(
            f"cannot reach {shown} (gave up after {waited:.1f} s; "
            f"${ENV_CONNECT_TIMEOUT} sets the wait): {reason}"
        )
    return StorageError(f"cannot use {shown}: {reason}")


def first_connection(
    url: str, connect_args: dict[str, Any], *, budget: float | None = None
) -> sqlalchemy.engine.Engine:
    """A NullPool engine whose first connection has worked, waiting up to ``budget`` seconds.

    Outages (connection refused, the server starting up, too many clients) are retried until
    the budget (default ``$SEARCH_CONNECT_TIMEOUT``) is spent, each attempt's connect timeout
    cut to what is left of it; mistakes (no such database or host, authentication failed, SSL
    required) are raised at once.

    Raises:
        StorageError: One line naming the redacted URL and the driver's reason.
    """
    budget = connect_timeout() if budget is None else budget
    engine = make_engine(url, poolclass=NullPool, connect_args=dict(connect_args))
    started = time.monotonic()
    connected = False
    if engine.dialect.name == "postgresql":

        @sqlalchemy.event.listens_for(engine, "do_connect")
        def _attempt_timeout(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
            if not connected:
                left = budget - (time.monotonic() - started)
                cparams["connect_timeout"] = max(2, min(PG_CONNECT_TIMEOUT_S, math.ceil(left)))

    def ping() -> None:
        nonlocal connected
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        connected = True

    try:
        call_with_retry(ping, max_wait=budget, what="connect", log=False)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise unreachable(url, exc, time.monotonic() - started) from None
    return engine
