"""Storage URLs: the default, where a URL comes from, and redaction of secrets."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote
from urllib.parse import quote_plus
from urllib.parse import urlsplit

from sqlalchemy.engine import URL
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from storage._error import StorageError

ENV_STORAGE = "SEARCH_STORAGE"
ENV_STORAGE_FILE = "SEARCH_STORAGE_FILE"
DEFAULT_FILENAME = "search.db"
REDACTED = "***"
PROXY_SCHEME = "grpc://"  # a `search proxy` in front of the database
DEFAULT_PROXY_PORT = 13000

# Query parameters that carry secrets in libpq / SQLAlchemy URLs.
_SECRET_QUERY_KEYS = ("password", "sslpassword", "passfile")
_QUERY_SECRET = re.compile(r"(?P<key>\b(?:" + "|".join(_SECRET_QUERY_KEYS) + r")=)[^&;\s]*", re.I)


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
    """The storage URL to use, from the first of these that is set.

    1. ``value`` (the ``--storage`` option);
    2. ``$SEARCH_STORAGE``;
    3. ``$SEARCH_STORAGE_FILE``: a file holding the URL (a Docker/Kubernetes secret, like the
       postgres image's ``POSTGRES_PASSWORD_FILE``), so the password is on no command line;
    4. the SQLite default, ``search.db`` in the working directory.

    Blank strings count as unset. ``postgres://`` (as some hosts write it) becomes
    ``postgresql://``, which SQLAlchemy requires.

    Args:
        value: The ``--storage`` option, if given.

    Returns:
        The URL, not yet checked for reachability.

    Raises:
        StorageError: ``$SEARCH_STORAGE_FILE`` names a missing, unreadable or empty file.
    """
    source = storage_url_source(value)
    if source == "option":
        return normalize_url(str(value).strip())
    if source == ENV_STORAGE:
        return normalize_url(os.environ[ENV_STORAGE].strip())
    if source == ENV_STORAGE_FILE:
        return normalize_url(read_url_file(os.environ[ENV_STORAGE_FILE].strip()))
    return default_storage_url()


def storage_url_source(value: str | None) -> str:
    """Where :func:`resolve_storage_url` takes the URL from: ``"option"``, ``"SEARCH_STORAGE"``,
    ``"SEARCH_STORAGE_FILE"`` or ``"default"`` (blank values count as unset)."""
    if value is not None and value.strip():
        return "option"
    for name in (ENV_STORAGE, ENV_STORAGE_FILE):
        if os.environ.get(name, "").strip():
            return name
    return "default"


def read_url_file(path: str) -> str:
    """The URL held in ``path`` (surrounding whitespace and a trailing newline dropped)."""
    where = f"${ENV_STORAGE_FILE}={path}"
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise StorageError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise StorageError(f"{where}: cannot read it ({reason})") from None
    if not text:
        raise StorageError(f"{where}: the file is empty (it must hold the storage URL)")
    if "\n" in text:
        raise StorageError(f"{where}: the file must hold one line, the storage URL")
    return text


def normalize_url(url: str) -> str:
    """Spell the scheme the way SQLAlchemy wants it (``postgres://`` -> ``postgresql://``).

    Example:
        >>> normalize_url("postgres+psycopg://u@h/db")
        'postgresql+psycopg://u@h/db'
    """
    if url.startswith(("postgres://", "postgres+")):
        return "postgresql" + url.removeprefix("postgres")
    return url


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs, messages and study attributes.

    Parsed with SQLAlchemy's own URL parser (so a password with ``/``, ``?`` or ``#`` is
    hidden whole); URLs without a password keep their spelling. Text SQLAlchemy cannot parse,
    or whose host would contain ``@`` (a raw ``@`` in the password), is redacted up to the
    last ``@``. Secret query parameters (``password=``, ``sslpassword=``) are hidden too.

    Example:
        >>> redact_url("postgresql://search:s3cret@db:5432/search")
        'postgresql://search:***@db:5432/search'
        >>> redact_url("postgresql://u:a%2Fb%3F%23%40%3A%25@h/db")
        'postgresql://u:***@h/db'

    Args:
        url: Any storage URL.

    Returns:
        The same URL without secrets.
    """
    parsed = _parse(url)
    if parsed is None or (parsed.host is not None and "@" in parsed.host):
        text = _redact_userinfo(url)
    elif parsed.password is None:
        text = url
    else:
        text = parsed.render_as_string(hide_password=True)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{REDACTED}", text)


def _parse(url: str) -> URL | None:
    try:
        return make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return None


def _redact_userinfo(text: str) -> str:
    """The fallback: hide what follows ``user:`` up to the last ``@`` after ``://``."""
    scheme, sep, rest = text.partition("://")
    if not sep or "@" not in rest:
        return text
    userinfo, at, host = rest.rpartition("@")
    if ":" in userinfo:
        userinfo = f"{userinfo.split(':', 1)[0]}:{REDACTED}"
    elif "/" in userinfo:  # no user: the text before '@' is not a user name, hide it all
        userinfo = REDACTED
    return f"{scheme}{sep}{userinfo}{at}{host}"


def url_secrets(url: str) -> list[str]:
    """The secrets in ``url`` as they may appear in text: raw and percent-encoded.

    Example:
        >>> url_secrets("postgresql://u:a%2Fb@h/db")
        ['a/b', 'a%2Fb']
    """
    found: list[str] = []
    parsed = _parse(url)
    values: list[str] = []
    if parsed is not None:
        if parsed.password:
            values.append(str(parsed.password))
        for key in _SECRET_QUERY_KEYS:
            value = parsed.query.get(key)
            values.extend([value] if isinstance(value, str) else list(value or ()))
    else:
        _, sep, rest = url.partition("://")
        userinfo = rest.rpartition("@")[0] if sep else ""
        if ":" in userinfo:
            values.append(userinfo.split(":", 1)[1])
    for value in values:
        for form in (value, quote(value, safe=""), quote_plus(value)):
            if len(form) >= 3 and form not in found:  # too short to scrub without mangling
                found.append(form)
    return found


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message) with every form of ``url``'s secrets hidden."""
    for secret in url_secrets(url):
        text = text.replace(secret, REDACTED)
    return text


def sqlite_file(url: str | URL) -> str | None:
    """The database file of an SQLite URL as written (not resolved); None for in-memory SQLite,
    any other backend, or text that is not a URL.

    Example:
        >>> sqlite_file("sqlite:///runs/search.db"), sqlite_file("sqlite:///:memory:")
        ('runs/search.db', None)
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database:
        return None
    if database == ":memory:" or database.startswith("file::memory:"):
        return None
    return database


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
    except (ArgumentError, ValueError):  # the parser's message may quote part of a password
        raise StorageError(
            f"bad storage URL {redact_url(url)!r}: cannot parse it (expected "
            f"dialect[+driver]://user:password@host:port/database; percent-encode "
            f"/ ? # @ : % in the password)"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file::memory:"):
            return backend, None
        return backend, str(Path(database).expanduser().resolve())
    if parsed.host is not None and "@" in parsed.host:
        raise StorageError(
            f"bad storage URL {redact_url(url)!r}: '@' in the password must be written %40 "
            f"(percent-encode / ? # @ : % in passwords)"
        )
    if not parsed.database:
        raise StorageError(f"bad storage URL {redact_url(url)!r}: no database name")
    return backend, None


def is_proxy_url(url: str) -> bool:
    """Whether ``url`` names a ``search proxy`` (``grpc://host:port``)."""
    return url.strip().lower().startswith(PROXY_SCHEME)


def proxy_address(url: str) -> tuple[str, int]:
    """``(host, port)`` of a ``grpc://host[:port]`` URL (port 13000 by default).

    Example:
        >>> proxy_address("grpc://proxy:13001"), proxy_address("grpc://[::1]")
        (('proxy', 13001), ('::1', 13000))
    """
    parts = urlsplit(url.strip())
    if "@" in url:  # anywhere: a raw / ? # in a password ends urlsplit's netloc before it
        raise StorageError(
            f"bad storage URL {_redact_userinfo(url)!r}: a proxy URL holds no user or password "
            f"(the proxy holds the database's)"
        )
    try:
        port = parts.port or DEFAULT_PROXY_PORT
    except ValueError:
        port = -1
    if not parts.hostname or port <= 0 or parts.path not in ("", "/") or parts.query:
        raise StorageError(
            f"bad storage URL {redact_url(url)!r}: expected grpc://host:port (the address of "
            f"`search proxy`)"
        )
    return parts.hostname, port
