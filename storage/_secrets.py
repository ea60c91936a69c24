"""Refuse a long-running service (worker, dashboard) on a placeholder or missing password.

The rule: a password that is a known placeholder (``PLACEHOLDER_PASSWORDS``, or the user
name) is refused on any host; no password at all is refused for a host that is not local
(``localhost``, ``127.x``, ``::1``, a Unix socket), unless libpq gets one elsewhere
(``$PGPASSWORD``, a passfile, a client certificate). Local trust authentication, as on a
laptop or in CI (``postgresql://postgres@127.0.0.1/db``), keeps working. SQLite has no
password.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from sqlalchemy.engine import make_url

from storage._error import StorageError
from storage._url import redact_url

# Lower-case; what example files and tutorials ship. Generate a real one: openssl rand -hex 24
PLACEHOLDER_PASSWORDS = frozenset(
    {"change-me", "changeme", "change_me", "password", "postgres", "secret", "search"}
)
GENERATE = "generate one with `openssl rand -hex 24`"
# Where libpq finds a password or a client certificate when the URL has none.
_CREDENTIAL_QUERY = ("password", "passfile", "sslcert", "sslkey")
_CREDENTIAL_ENV = ("PGPASSWORD", "PGPASSFILE", "PGSSLCERT")
_CREDENTIAL_FILES = (".pgpass", ".postgresql/postgresql.crt")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only.

    Example:
        >>> [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "10.0.0.5")]
        [True, True, True, False, False]
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def is_local_host(host: str | None) -> bool:
    """Whether a PostgreSQL host is this machine (a Unix socket, localhost, loopback).

    Example:
        >>> [is_local_host(h) for h in (None, "localhost", "127.0.0.1", "/run/pg", "db")]
        [True, True, True, True, False]
    """
    return not host or host.startswith("/") or is_loopback(host)


def check_password(url: str) -> None:
    """Raise a one-line ``StorageError`` if ``url``'s password is a placeholder or missing.

    Example:
        >>> check_password("postgresql://postgres@127.0.0.1/search_test")
        >>> check_password("postgresql://search:change-me@db/search")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        storage._error.StorageError: the password in postgresql://search:***@db/search is a ...

    Args:
        url: The storage URL a worker or dashboard is about to use.
    """
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - a bad URL is reported where it is opened
        return
    if parsed.get_backend_name() in ("sqlite", "grpc"):  # a search proxy holds the password
        return
    shown = redact_url(url)
    query_password = parsed.query.get("password")
    password = parsed.password or (query_password if isinstance(query_password, str) else None)
    password = password or os.environ.get("PGPASSWORD") or None
    if password is not None:
        lowered = str(password).strip().lower()
        if lowered in PLACEHOLDER_PASSWORDS or lowered == (parsed.username or "").lower():
            raise StorageError(
                f"the password in {shown} is a placeholder (like change-me, password, "
                f"postgres, or the user name): {GENERATE}"
            )
        if lowered:
            return
    host = parsed.host or _query_host(parsed.query.get("host"))
    if is_local_host(host) or _credentials_elsewhere(parsed.query):
        return
    raise StorageError(
        f"{shown} has no password for host {host!r}: {GENERATE} and put it in the URL "
        f"(better: in the file named by $SEARCH_STORAGE_FILE)"
    )


def _query_host(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, tuple) and value:
        return str(value[0])
    return None


def _credentials_elsewhere(query: object) -> bool:
    """Whether libpq will find a password or certificate outside the URL's userinfo."""
    if any(key in query for key in _CREDENTIAL_QUERY):  # type: ignore[operator]
        return True
    if any(os.environ.get(name) for name in _CREDENTIAL_ENV):
        return True
    home = Path.home()
    return any((home / name).is_file() for name in _CREDENTIAL_FILES)
