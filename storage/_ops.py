"""Database operations of the budget rule that Optuna's storage API has no call for.

Each runs on an ``RDBStorage`` in one transaction; a worker runs them on its own storage, and
``search proxy`` runs them on behalf of workers that reach it over gRPC (``storage._proxy``).
:func:`fail_and_enqueue` is a write retried while the database is away: it is made
idempotent by a token, as ``storage._rdb``'s writes are.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Mapping
from datetime import datetime
from datetime import timedelta
from typing import Any

import sqlalchemy
from optuna.storages import BaseStorage
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from storage._rdb import STATE_TOKEN
from storage._rdb import read_state_token
from storage._rdb import stamp_template
from storage._retry import call_with_retry
from storage.compat import add_trial_in
from storage.compat import rdb_backend
from storage.compat import scoped_session
from storage.compat import set_trial_attr_in
from storage.compat import tables

_logger = logging.getLogger(__name__)


def stale_trial_ids(rdb: RDBStorage, study_id: int, grace: float) -> list[int]:
    """RUNNING trials of the study whose last heartbeat is older than ``grace`` seconds.

    Optuna's ``_get_stale_trial_ids`` with the grace period given (the server's clock).
    """
    trials, beats = tables.TrialModel, tables.TrialHeartbeatModel
    query = (
        sqlalchemy.select(trials.trial_id, beats.heartbeat)
        .join(beats, beats.trial_id == trials.trial_id)
        .where(trials.study_id == study_id, trials.state == TrialState.RUNNING)
    )
    with rdb.engine.connect() as conn:
        now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar()
        assert now is not None
        now = now.replace(tzinfo=None)
        rows = list(conn.execute(query))
    cutoff = timedelta(seconds=grace)
    return [trial_id for trial_id, beat in rows if now - beat.replace(tzinfo=None) > cutoff]


def adopt_orphans_in(rdb: RDBStorage, study_id: int, grace: float) -> list[int]:
    """Give a first heartbeat to RUNNING trials without one that are older than ``grace`` s.

    Returns:
        The ids of the adopted trials.
    """
    trials, beats = tables.TrialModel, tables.TrialHeartbeatModel
    query = sqlalchemy.select(trials.trial_id).where(
        trials.study_id == study_id,
        trials.state == TrialState.RUNNING,
        trials.trial_id.not_in(sqlalchemy.select(beats.trial_id)),
    )
    with rdb.engine.connect() as conn:
        orphans = list(conn.execute(query).scalars())
    # datetime_start comes from the clock of the client that started the trial.
    cutoff = datetime.now() - timedelta(seconds=grace)
    adopted = []
    for trial_id in orphans:  # rare: read each through Optuna (its time zone handling)
        frozen = rdb.get_trial(trial_id)
        if frozen.datetime_start is None or frozen.datetime_start < cutoff:
            _logger.warning("trial %d is RUNNING without a heartbeat; adopting it", frozen.number)
            rdb.record_heartbeat(trial_id)
            adopted.append(trial_id)
    return adopted


def fail_and_enqueue_in(
    rdb: RDBStorage,
    study_id: int,
    trial_id: int,
    user_attrs: Mapping[str, Any],
    copy: FrozenTrial | None,
    *,
    token: str | None = None,
    retried: bool = False,
) -> bool:
    """Fail a RUNNING trial (setting ``user_attrs``) and add ``copy``, in one transaction.

    The study's and the trial's rows are locked and the state checked inside the transaction,
    so of two processes racing for one trial only one wins. ``token`` is written as the failed
    trial's ``state_token`` (the copy gets a ``client_token`` of its own); with ``retried``, a
    trial found FAIL with that token was failed by this call's earlier attempt (its commit's
    acknowledgement lost): True.

    Returns:
        Whether the trial was RUNNING (and is now failed, with its copy queued).
    """
    token = token or uuid.uuid4().hex
    with scoped_session(rdb) as session:
        tables.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        row = tables.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        if row.state != TrialState.RUNNING:
            return (
                retried
                and row.state == TrialState.FAIL
                and read_state_token(session, trial_id) == token
            )
        for key, value in user_attrs.items():
            set_trial_attr_in(rdb, session, trial_id, key, value)
        set_trial_attr_in(rdb, session, trial_id, STATE_TOKEN, token, system=True)
        row.state = TrialState.FAIL
        row.datetime_complete = datetime.now()
        if copy is not None:
            add_trial_in(rdb, session, study_id, stamp_template(copy, uuid.uuid4().hex))
        return True


def fail_and_enqueue(
    storage: BaseStorage,
    study_id: int,
    trial_id: int,
    user_attrs: Mapping[str, Any],
    copy: FrozenTrial | None,
    *,
    max_wait: float | None = None,
) -> bool | None:
    """:func:`fail_and_enqueue_in` on ``storage``'s database, or by its ``search proxy``.

    Retried while the database (or the proxy) is away, for up to ``max_wait`` seconds (the
    storage's own ``max_wait`` by default), with one token for all attempts: an attempt whose
    commit went through but whose answer was lost is not taken for someone else's failure.
    Call it as it is, not inside another retry (each outer attempt would get a new token).

    Returns:
        Whether the trial was failed; ``None`` if the storage has no database to do it in
        one transaction (in-memory storages: the caller does it in two steps).
    """
    remote = getattr(storage, "fail_and_enqueue", None)
    rdb = rdb_backend(storage)
    if remote is None and rdb is None:
        return None
    if max_wait is None:
        max_wait = float(getattr(rdb if rdb is not None else storage, "max_wait", 120.0))
    token = uuid.uuid4().hex
    tries = itertools.count()

    def once() -> bool:
        retried = next(tries) > 0
        if remote is not None:
            return bool(remote(study_id, trial_id, user_attrs, copy, token=token, retried=retried))
        assert rdb is not None
        return fail_and_enqueue_in(
            rdb, study_id, trial_id, user_attrs, copy, token=token, retried=retried
        )

    return call_with_retry(once, max_wait=max_wait, what="fail and re-queue")
