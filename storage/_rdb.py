"""An Optuna ``RDBStorage`` whose every database call survives a brief outage."""

from __future__ import annotations

from collections.abc import Container
from collections.abc import Mapping
from typing import Any

from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from storage._fast_read import read_trials
from storage._retry import retrying

# Above this many ids in an IN list, use Optuna's own read (SQLite limits bound variables).
_MAX_INCLUDED_IDS = 500

# The RDBStorage methods Optuna (and its _CachedStorage wrapper) call; each opens its own
# session, so running one again after a dropped connection is safe. record_heartbeat is left
# out on purpose: the heartbeat thread retries it on its own schedule.
_RETRIED_METHODS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "_create_new_trial",
    "set_trial_param",
    "_set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_user_attrs",
    "set_trial_attrs",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id",
    "get_trial",
    "get_trial_params",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_trials",
    "_get_trials",
    "get_best_trial",
    "_get_best_trial_id",
    "get_n_trials",
    "_get_stale_trial_ids",
)


class ResilientRDBStorage(RDBStorage):
    """``RDBStorage`` that waits and retries when the database is briefly unreachable.

    Trials are read with SQLAlchemy Core (``storage._fast_read``), ~10x faster than Optuna's
    ORM read at 10,000 trials, with the same result. A PostgreSQL restart drops every pooled
    connection; ``pool_pre_ping`` replaces dead ones at
    checkout, and a statement caught mid-flight (or a connect refused while the server starts)
    is retried with exponential backoff for up to ``max_wait`` seconds before the error is
    raised. Errors that are not about the connection (bad data, integrity) are raised at once.

    Example:
        >>> s = ResilientRDBStorage("sqlite:///:memory:", max_wait=5)
        >>> s.get_all_studies()
        []

    Args:
        url: SQLAlchemy URL.
        engine_kwargs: Passed to ``sqlalchemy.create_engine``.
        max_wait: Seconds to keep retrying one call while the database is away.
        **kwargs: Keyword arguments of ``RDBStorage`` (heartbeats, callbacks, ...).
    """

    def __init__(
        self,
        url: str,
        engine_kwargs: dict[str, Any] | None = None,
        *,
        max_wait: float = 120.0,
        **kwargs: Any,
    ) -> None:
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, but got {max_wait=}.")
        self.max_wait = max_wait
        try:
            super().__init__(url, engine_kwargs, **kwargs)
        except BaseException:
            engine = getattr(self, "engine", None)
            if engine is not None:  # close what the failed start opened (it may be retried)
                engine.dispose()
            raise

    def _get_trials(
        self,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        if len(included_trial_ids) > _MAX_INCLUDED_IDS:
            return super()._get_trials(study_id, states, included_trial_ids, trial_id_greater_than)
        trials = read_trials(
            self.engine, study_id, states, included_trial_ids, trial_id_greater_than
        )
        if trials is None:
            raise KeyError(models.NOT_FOUND_MSG)
        return trials

    def set_trial_user_attrs(self, trial_id: int, values: Mapping[str, Any]) -> None:
        """Set many user attributes of a trial in one transaction (one per key in Optuna)."""
        self.set_trial_attrs(trial_id, values, {})

    def set_trial_attrs(
        self, trial_id: int, user: Mapping[str, Any], system: Mapping[str, Any]
    ) -> None:
        """Set a trial's user and system attributes in one transaction."""
        with _create_scoped_session(self.scoped_session, True) as session:
            for model, values in (
                (models.TrialUserAttributeModel, user),
                (models.TrialSystemAttributeModel, system),
            ):
                for key, value in values.items():
                    self._set_trial_attr_without_commit(session, model, trial_id, key, value)


for _name in _RETRIED_METHODS:
    if hasattr(ResilientRDBStorage, _name):
        _method = getattr(ResilientRDBStorage, _name)
        setattr(ResilientRDBStorage, _name, retrying("max_wait")(_method))
