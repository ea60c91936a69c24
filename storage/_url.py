"""Storage URLs: the default, the resolution order and redaction of secrets."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from storage._error import StorageError

ENV_STORAGE = "SEARCH_STORAGE"
DEFAULT_FILENAME = "search.db"

# Query parameters that carry secrets in libpq / SQLAlchemy URLs.
_SECRET_QUERY_KEYS = ("password", "sslpassword", "passfile")
_QUERY_SECRET = re.compile(r"(?P<key>\b(?:" + "|".join(_SECRET_QUERY_KEYS) + r")=)[^&;#\s]*", re.I)


def default_storage_url(directory: Path | None = None) -> str:
    """The embedded default: an SQLite file ``search.db`` in ``directory`` (default: the cwd).

    Example:
        >>> default_storage_url(Path("/tmp")).endswith("/tmp/search.db")
        True

    Args:
        directory: Where the database file lives.

    Returns:
        An absolute ``sqlite:///`` URL.
    """
    base = (directory if directory is not None else Path.cwd()).resolve()
    return f"sqlite:///{base / DEFAULT_FILENAME}"


def resolve_storage_url(value: str | None) -> str:
    """The storage URL to use: ``value``, else ``$SEARCH_STORAGE``, else the SQLite default.

    Blank strings count as unset. ``postgres://`` (as some hosts write it) becomes
    ``postgresql://``, which SQLAlchemy requires.

    Args:
        value: The ``--storage`` option, if given.

    Returns:
        The URL, not yet checked for reachability.
    """
    for candidate in (value, os.environ.get(ENV_STORAGE)):
        if candidate is not None and candidate.strip():
            return normalize_url(candidate.strip())
    return default_storage_url()


def normalize_url(url: str) -> str:
    """Spell the scheme the way SQLAlchemy wants it (``postgres://`` -> ``postgresql://``)."""
    if url.startswith("postgres://"):
        return "postgresql://" + url.removeprefix("postgres://")
    return url


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs, messages and study attributes.

    Only the secret is touched (the rest keeps its spelling), and URLs SQLAlchemy cannot parse
    are redacted too.

    Example:
        >>> redact_url("postgresql://search:s3cret@db:5432/search")
        'postgresql://search:***@db:5432/search'

    Args:
        url: Any storage URL.

    Returns:
        The same URL without secrets.
    """
    scheme, sep, rest = url.partition("://")
    if sep:
        netloc, slash, path = rest.partition("/")
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
        url = f"{scheme}{sep}{netloc}{slash}{path}"
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}***", url)


def parse_url(url: str) -> tuple[str, str | None]:
    """Check a URL and return its backend name and, for SQLite, the database file path.

    Args:
        url: A SQLAlchemy URL.

    Returns:
        ``(backend, path)``: backend ``sqlite``, ``postgresql`` or another SQLAlchemy backend;
        path is the SQLite file (``None`` for in-memory SQLite and for servers).

    Raises:
        StorageError: The URL cannot be parsed or names no database.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise StorageError(f"bad storage URL {redact_url(url)!r}: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file::memory:"):
            return backend, None
        return backend, str(Path(database).expanduser().resolve())
    if not parsed.database:
        raise StorageError(f"bad storage URL {redact_url(url)!r}: no database name")
    return backend, None
