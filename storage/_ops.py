"""Database operations of the budget rule that Optuna's storage API has no call for.

Each runs on an ``RDBStorage`` in one transaction; a worker runs them on its own storage, and
``search proxy`` runs them on behalf of workers that reach it over gRPC (``storage._proxy``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from datetime import timedelta
from typing import Any

import sqlalchemy
from optuna.storages import BaseStorage
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from storage._lock import rdb_backend

_logger = logging.getLogger(__name__)


def stale_trial_ids(rdb: RDBStorage, study_id: int, grace: float) -> list[int]:
    """RUNNING trials of the study whose last heartbeat is older than ``grace`` seconds.

    Optuna's ``_get_stale_trial_ids`` with the grace period given (the server's clock).
    """
    trials, beats = models.TrialModel, models.TrialHeartbeatModel
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
    trials, beats = models.TrialModel, models.TrialHeartbeatModel
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
) -> bool:
    """Fail a RUNNING trial (setting ``user_attrs``) and add ``copy``, in one transaction.

    The study's and the trial's rows are locked and the state checked inside the transaction,
    so of two processes racing for one trial only one wins.

    Returns:
        Whether the trial was RUNNING (and is now failed, with its copy queued).
    """
    with _create_scoped_session(rdb.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        row = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        if row.state != TrialState.RUNNING:
            return False
        for key, value in user_attrs.items():
            rdb._set_trial_attr_without_commit(
                session, models.TrialUserAttributeModel, trial_id, key, value
            )
        row.state = TrialState.FAIL
        row.datetime_complete = datetime.now()
        if copy is not None:
            rdb._get_prepared_new_trial(study_id, copy, session)
        return True


def fail_and_enqueue(
    storage: BaseStorage,
    study_id: int,
    trial_id: int,
    user_attrs: Mapping[str, Any],
    copy: FrozenTrial | None,
) -> bool | None:
    """:func:`fail_and_enqueue_in` on ``storage``'s database, or by its ``search proxy``.

    Returns:
        Whether the trial was failed; ``None`` if the storage has no database to do it in
        one transaction (in-memory storages: the caller does it in two steps).
    """
    remote = getattr(storage, "fail_and_enqueue", None)
    if remote is not None:
        return bool(remote(study_id, trial_id, user_attrs, copy))
    rdb = rdb_backend(storage)
    if rdb is None:
        return None
    return fail_and_enqueue_in(rdb, study_id, trial_id, user_attrs, copy)
