"""``search storage check``: is the database reachable, and is its schema current?"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy
from optuna.storages._rdb.storage import RDBStorage
from sqlalchemy.pool import NullPool

from storage._create import engine_kwargs_for
from storage._error import StorageError
from storage._url import normalize_url
from storage._url import parse_url
from storage._url import redact_url

CHECK_CONNECT_TIMEOUT_S = 5


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

    The upgrade is Optuna's own (Alembic, as ``optuna storage upgrade`` runs it). Back up the
    database first; stop the workers while it runs.

    Example:
        >>> check_storage("sqlite:///:memory:").reachable
        True

    Args:
        url: Storage URL.
        upgrade: Upgrade an old schema to this Optuna's head revision.

    Returns:
        The status; nothing is raised for an unreachable database.

    Raises:
        StorageError: The URL itself is bad (cannot be parsed, unknown driver).
    """
    url = normalize_url(url)
    shown = redact_url(url)
    backend, _ = parse_url(url)
    connect_args = dict(engine_kwargs_for(backend).get("connect_args", {}))
    if backend == "postgresql":
        connect_args["connect_timeout"] = CHECK_CONNECT_TIMEOUT_S
    try:
        engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    except (sqlalchemy.exc.ArgumentError, ImportError) as exc:
        raise StorageError(f"bad storage URL {shown!r}: {exc}") from None
    head = head_version()
    try:
        with engine.connect() as conn:
            from alembic.runtime.migration import MigrationContext  # slow import: only here

            current = MigrationContext.configure(conn).get_current_revision()
    except sqlalchemy.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return StorageStatus(
            shown, False, False, None, head, False, f"{shown}: unreachable: {reason}"
        )
    finally:
        engine.dispose()
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
