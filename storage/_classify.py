"""Which database errors are an outage (wait and retry) and which are a mistake (say so now).

The server's SQLSTATE decides where the driver gives one (psycopg 3 ``sqlstate``, psycopg2
``pgcode``). Failures to connect carry none (libpq reports them as text), so for those, and
for SQLite, the message decides.
"""

from __future__ import annotations

import re
from typing import Literal

from sqlalchemy import exc as sa_exc

Kind = Literal["transient", "permanent"]

# SQLSTATEs of an outage: the connection or the server is away for now, or the statement lost
# a race with another worker and may simply run again.
_TRANSIENT_STATES = {
    "53300",  # too_many_connections
    "57P01",  # admin_shutdown (restart, pg_terminate_backend)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (starting up, shutting down, recovery)
    "57P05",  # idle_session_timeout
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "25006",  # read_only_sql_transaction (a failover not finished yet)
}
_TRANSIENT_CLASSES = ("08", "53")  # connection exception, insufficient resources
# SQLSTATEs of a mistake that waiting cannot fix.
_PERMANENT_STATES = {
    "3D000",  # invalid_catalog_name: the database does not exist
    "57P04",  # database_dropped
    "42501",  # insufficient_privilege
    "3F000",  # invalid_schema_name
}
_PERMANENT_CLASSES = ("28",)  # invalid authorization: bad password, unknown role

# Connect-time messages (libpq via psycopg 3 / psycopg2) that no retry can fix.
_PERMANENT_TEXT = re.compile(
    "|".join(
        [
            r"password authentication failed",
            r"authentication failed",
            r"no pg_hba\.conf entry",
            r"no password supplied",
            r"role \".*\" does not exist",
            r"database \".*\" does not exist",
            r"could not translate host name",
            r"failed to resolve host",
            r"name or service not known",
            r"nodename nor servname",
            r"no address associated with hostname",
            r"ssl was required",
            r"server does not support ssl",
            r"invalid response to ssl negotiation",
            r"certificate",
            r"invalid (?:connection option|dsn|sslmode|integer value)",
            r"permission denied",
            r"unable to open database file",  # SQLite: a directory or a file it may not read
            r"file is not a database",
            r"no such (?:table|column)",
        ]
    ),
    re.I,
)


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a driver error (or of the driver error SQLAlchemy wraps), if any."""
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    for attr in ("sqlstate", "pgcode"):
        code = getattr(orig, attr, None)
        if isinstance(code, str) and len(code) == 5:
            return code
    return None


def classify(error: BaseException) -> Kind | None:
    """``"transient"``, ``"permanent"`` or ``None`` (not a database availability question).

    The chain of causes is followed (Optuna wraps SQLAlchemy errors in
    ``StorageInternalError``); the first database error found decides.

    Example:
        >>> refused = sa_exc.OperationalError("", {}, Exception("Connection refused"))
        >>> classify(refused)
        'transient'
        >>> classify(sa_exc.OperationalError("", {}, Exception('database "x" does not exist')))
        'permanent'
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = _classify_one(current)
        if kind is not None:
            return kind
        current = current.__cause__ or current.__context__
    return None


def _classify_one(error: BaseException) -> Kind | None:
    if isinstance(error, sa_exc.DisconnectionError):
        return "transient"
    code_of = getattr(error, "code", None)
    if type(error).__module__.startswith("grpc") and callable(code_of):
        # search proxy: away (restarting, unreachable) is an outage; anything else is not.
        return "transient" if getattr(code_of(), "name", "") == "UNAVAILABLE" else None
    if not isinstance(error, sa_exc.DBAPIError):
        return None
    code = sqlstate(error)
    if code is not None:
        if code in _PERMANENT_STATES or code.startswith(_PERMANENT_CLASSES):
            return "permanent"
        if code in _TRANSIENT_STATES or code.startswith(_TRANSIENT_CLASSES):
            return "transient"
        # The server answered with a statement error: not an outage.
        return "transient" if error.connection_invalidated else None
    if error.connection_invalidated:
        return "transient"
    if not isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return None
    text = str(error.orig if error.orig is not None else error)
    if _PERMANENT_TEXT.search(text):
        return "permanent"
    # Any other OperationalError without a SQLSTATE is an outage: connection refused, server
    # closed the connection unexpectedly, too many clients, the database system is starting
    # up, a timeout, SQLite's "database is locked" (the wait is bounded).
    return "transient"
