"""``search storage check``: is the database reachable, and is its schema current?"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy
from optuna.storages import RDBStorage

from storage._create import check_sqlite_path
from storage._create import engine_kwargs_for
from storage._engine import check_driver
from storage._engine import first_connection
from storage._engine import unreachable
from storage._error import StorageUnreachable
from storage._url import is_proxy_url
from storage._url import normalize_url
from storage._url import parse_url
from storage._url import redact_url


@dataclass(frozen=True)
class StorageStatus:
    """What ``check_storage`` found.

    Args:
        url: The URL, password redacted.
        reachable: A connection could be made.
        schema_current: The Optuna schema is at this Optuna's head revision, or absent (it is
            created on first use).
        current_version: Alembic revision found in the database (``None``: no schema yet).
        head_version: Alembic revision this Optuna expects.
        upgraded: The schema was upgraded by this call.
        message: One line for the user.
    """

    url: str
    reachable: bool
    schema_current: bool
    current_version: str | None
    head_version: str | None
    upgraded: bool
    message: str

    @property
    def ok(self) -> bool:
        """Reachable with a current (or not yet created) schema."""
        return self.reachable and self.schema_current


def head_version() -> str:
    """The Alembic revision of the schema this Optuna writes."""
    storage = RDBStorage("sqlite:///:memory:")
    try:
        return storage.get_head_version()
    finally:
        storage.engine.dispose()


def check_storage(url: str, *, upgrade: bool = False) -> StorageStatus:
    """Say whether the storage is reachable and its schema current; upgrade it when asked.

    Read-only unless ``upgrade``: a missing SQLite file is an error, never created. The upgrade
    is Optuna's own (Alembic, as ``optuna storage upgrade`` runs it). Back up the database
    first; stop the workers while it runs.

    Example:
        >>> check_storage("sqlite:///:memory:").reachable
        True

    Args:
        url: Storage URL.
        upgrade: Upgrade an old schema to this Optuna's head revision.

    Returns:
        The status; a server that does not answer within ``$SEARCH_CONNECT_TIMEOUT`` is
        ``reachable=False``.

    Raises:
        StorageError: A mistake: the URL is bad, its driver missing, the SQLite file missing,
            the database, role or host unknown, authentication failed.
    """
    url = normalize_url(url)
    shown = redact_url(url)
    head = head_version()
    if is_proxy_url(url):
        return _check_proxy(url, head, upgrade=upgrade)
    try:
        current = _current_revision(url)
    except StorageUnreachable as exc:
        return StorageStatus(shown, False, False, None, head, False, str(exc))
    if current is None:
        message = f"{shown}: reachable; no Optuna schema yet (created on first use, {head})"
        return StorageStatus(shown, True, True, None, head, False, message)
    if current == head:
        message = f"{shown}: reachable; schema current ({head})"
        return StorageStatus(shown, True, True, current, head, False, message)
    if not upgrade:
        message = (
            f"{shown}: reachable; schema {current} is older than {head}: run "
            f"`search storage check --upgrade` (back up the database first)"
        )
        return StorageStatus(shown, True, False, current, head, False, message)
    storage = RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)
    try:
        storage.upgrade()
        after = storage.get_current_version()
    finally:
        storage.engine.dispose()
    message = f"{shown}: reachable; schema upgraded from {current} to {after}"
    return StorageStatus(shown, True, after == head, after, head, True, message)


def _current_revision(url: str) -> str | None:
    """Connect (creating nothing) and read the Alembic revision of the Optuna schema."""
    shown = redact_url(url)
    backend, path = parse_url(url)
    check_driver(url)
    if path is not None:
        check_sqlite_path(path, shown, must_exist=True)
    connect_args = engine_kwargs_for(backend).get("connect_args", {})
    engine = first_connection(url, connect_args)
    try:
        with engine.connect() as conn:
            from alembic.runtime.migration import MigrationContext  # slow import: only here

            return MigrationContext.configure(conn).get_current_revision()
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise unreachable(url, exc, None) from None
    finally:
        engine.dispose()


def _check_proxy(url: str, head: str, *, upgrade: bool) -> StorageStatus:
    """A ``search proxy``: it answers (its database opened with a current schema at start)."""
    from storage._create import create_storage

    try:
        proxy = create_storage(url, heartbeat_interval=None)
    except StorageUnreachable as exc:
        return StorageStatus(url, False, False, None, head, False, str(exc))
    behind = getattr(proxy, "server", {}).get("storage", "its database")
    getattr(proxy, "close", lambda: None)()
    message = f"{url}: reachable; search proxy in front of {behind} (schema checked by the proxy)"
    if upgrade:
        message += "; --upgrade: run it against the database's URL, not the proxy"
    return StorageStatus(url, True, True, head, head, False, message)
