"""Fencing tokens: a claim's writes commit only while its holder still owns the budget lock.

The budget lock can expire under its holder: PostgreSQL ends the transaction of a holder silent
for ``$SEARCH_LOCK_TIMEOUT`` (a paused process, a partition) and ``search proxy`` ends its lease
after that long; the holder, when it resumes, does not know. A lock that can expire protects
nothing unless the writes it guards are fenced, so a worker that claims a trial first writes a
fresh random token as the study's system attribute ``budget_fence`` (its own committed
transaction), then reads the trials, and every trial it then creates or sets RUNNING is written
in a transaction that first checks, with an ``UPDATE ... WHERE value_json = <token>`` that also
row-locks the attribute, that the token is still its own (:func:`check_fence_in`). A holder whose
lock expired and was taken by another finds the other's token and raises :class:`LockLost`;
nothing is written. The check and the write commit together: a later holder's token write
waits for that commit, so the later holder's count (read after its token is written) includes
the write. The token travels to ``search proxy`` with the write (``storage._proxy_client``).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy
import sqlalchemy.orm
from optuna.storages import BaseStorage

from storage._error import StorageError
from storage.compat import rdb_backend
from storage.compat import tables

FENCE_KEY = "budget_fence"  # study system attribute: the token of the budget lock's holder


class LockLost(StorageError):
    """The budget lock was taken by another worker since this one took it; nothing written."""


@dataclass(frozen=True)
class Fence:
    """The token a claim's writes present: ``study_id``'s ``budget_fence`` must equal it."""

    study_id: int
    token: str


_held = threading.local()


def current_fence() -> Fence | None:
    """The fence this thread's trial writes present, if it is inside :func:`fenced`."""
    return getattr(_held, "fence", None)


@contextmanager
def fenced(fence: Fence | None) -> Iterator[None]:
    """Within the block, this thread's trial creations and state changes present ``fence``."""
    previous = current_fence()
    _held.fence = fence
    try:
        yield
    finally:
        _held.fence = previous


def check_fence_in(session: sqlalchemy.orm.Session, study_id: int) -> None:
    """In ``session``'s transaction: the study's fence still holds this thread's token.

    A no-op outside :func:`fenced` (or for another study). Row-locks the fence until the
    transaction ends.

    Raises:
        LockLost: Another holder has written its token since.
    """
    fence = current_fence()
    if fence is None or fence.study_id != study_id:
        return
    attrs = tables.StudySystemAttributeModel.__table__
    held = session.execute(
        sqlalchemy.update(attrs)
        .where(
            attrs.c.study_id == study_id,
            attrs.c.key == FENCE_KEY,
            attrs.c.value_json == json.dumps(fence.token),
        )
        .values(value_json=attrs.c.value_json)
    )
    if held.rowcount != 1:  # type: ignore[attr-defined]
        raise LockLost(
            "the budget lock was taken by another worker while this one held it (paused past "
            "$SEARCH_LOCK_TIMEOUT?): nothing written; claiming again"
        )


@contextmanager
def fence_writes(storage: BaseStorage, study_id: int) -> Iterator[Fence | None]:
    """Write a new token for the study, then fence this thread's trial writes with it.

    Call right after taking the budget lock and before reading the trials. Storages that do
    not check fences (in-memory ones: their lock cannot expire) get none.
    """
    backend = rdb_backend(storage) or storage
    if not getattr(backend, "checks_fences", False):
        yield None
        return
    fence = Fence(study_id, uuid.uuid4().hex)
    storage.set_study_system_attr(study_id, FENCE_KEY, fence.token)
    with fenced(fence):
        yield fence
