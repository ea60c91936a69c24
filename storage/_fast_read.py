"""Read many trials at once with SQLAlchemy Core (Optuna's ORM read is ~10x slower).

Optuna's ``RDBStorage._get_trials`` loads ORM objects for every trial, parameter and
attribute; at 10,000 trials with the runner's dozen user attributes that is ~250,000 ORM
objects and tens of seconds. This module runs the same filters as six Core queries (trials,
then each child table joined to the same trial selection), parses each distinct distribution
JSON once, and builds the same ``FrozenTrial`` objects.
"""

from __future__ import annotations

import datetime
import json
from collections import defaultdict
from collections.abc import Container
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import sqlalchemy
from optuna import distributions
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from storage.compat import tables

_UTC = datetime.UTC


def _local(value: datetime.datetime | None) -> datetime.datetime | None:
    """Naive UTC as stored -> naive local time, as Optuna's models return it."""
    if value is None:
        return None
    return value.replace(tzinfo=_UTC).astimezone().replace(tzinfo=None)


def read_trials(
    engine: sqlalchemy.engine.Engine,
    study_id: int,
    states: Container[TrialState] | None,
    included_trial_ids: set[int],
    trial_id_greater_than: int,
) -> list[FrozenTrial] | None:
    """The trials ``RDBStorage._get_trials`` would return, or ``None`` if the study is gone.

    Args:
        engine: The storage's engine.
        study_id: Study id.
        states: Only these states (``None``: all).
        included_trial_ids: Trials to read even when not above ``trial_id_greater_than``.
        trial_id_greater_than: Read trials with a larger id (``-1``: all).

    Returns:
        Frozen trials ordered by trial id.
    """
    t = tables.TrialModel.__table__
    included = {i for i in included_trial_ids if i <= trial_id_greater_than}
    where: list[Any] = [t.c.study_id == study_id]
    if states is not None:
        assert isinstance(states, Iterable)
        where.append(t.c.state.in_(list(states)))
    if included and trial_id_greater_than > -1:
        where.append(
            sqlalchemy.or_(t.c.trial_id.in_(included), t.c.trial_id > trial_id_greater_than)
        )
    elif trial_id_greater_than > -1:
        where.append(t.c.trial_id > trial_id_greater_than)
    selected = sqlalchemy.select(t.c.trial_id).where(*where)

    def children(model: Any, *columns: str) -> sqlalchemy.Select[Any]:
        table = model.__table__
        order = [table.c[c] for c in columns[:1]]
        return (
            sqlalchemy.select(*(table.c[c] for c in columns))
            .where(table.c.trial_id.in_(selected))
            .order_by(*order, table.primary_key.columns.values()[0])
        )

    with engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.select(
                t.c.trial_id, t.c.number, t.c.state, t.c.datetime_start, t.c.datetime_complete
            )
            .where(*where)
            .order_by(t.c.trial_id)
        ).all()
        if not rows:  # nothing new, or no such study: only then ask which (one query less)
            studies = tables.StudyModel.__table__
            exists = conn.execute(
                sqlalchemy.select(studies.c.study_id).where(studies.c.study_id == study_id)
            ).first()
            return [] if exists is not None else None
        params = conn.execute(
            children(
                tables.TrialParamModel,
                "trial_id",
                "param_name",
                "param_value",
                "distribution_json",
            )
        ).all()
        values = conn.execute(
            children(tables.TrialValueModel, "trial_id", "objective", "value", "value_type")
        ).all()
        user = conn.execute(
            children(tables.TrialUserAttributeModel, "trial_id", "key", "value_json")
        ).all()
        system = conn.execute(
            children(tables.TrialSystemAttributeModel, "trial_id", "key", "value_json")
        ).all()
        inter = conn.execute(
            children(
                tables.TrialIntermediateValueModel,
                "trial_id",
                "step",
                "intermediate_value",
                "intermediate_value_type",
            )
        ).all()

    return _assemble(rows, params, values, user, system, inter)


def _assemble(
    rows: Sequence[Any],
    params: Sequence[Any],
    values: Sequence[Any],
    user: Sequence[Any],
    system: Sequence[Any],
    inter: Sequence[Any],
) -> list[FrozenTrial]:
    """FrozenTrials from the rows of the trial table and of its child tables."""
    dist_cache: dict[str, distributions.BaseDistribution] = {}
    trial_params: dict[int, dict[str, Any]] = defaultdict(dict)
    trial_dists: dict[int, dict[str, distributions.BaseDistribution]] = defaultdict(dict)
    for trial_id, name, value, dist_json in params:
        dist = dist_cache.get(dist_json)
        if dist is None:
            dist = dist_cache[dist_json] = distributions.json_to_distribution(dist_json)
        trial_params[trial_id][name] = dist.to_external_repr(value)
        trial_dists[trial_id][name] = dist
    trial_values: dict[int, dict[int, float]] = defaultdict(dict)
    for trial_id, objective, value, value_type in values:
        trial_values[trial_id][objective] = tables.TrialValueModel.stored_repr_to_value(
            value, value_type
        )
    user_attrs: dict[int, dict[str, Any]] = defaultdict(dict)
    for trial_id, key, value_json in user:
        user_attrs[trial_id][key] = json.loads(value_json)
    system_attrs: dict[int, dict[str, Any]] = defaultdict(dict)
    for trial_id, key, value_json in system:
        system_attrs[trial_id][key] = json.loads(value_json)
    intermediate: dict[int, dict[int, float]] = defaultdict(dict)
    stored_to_value = tables.TrialIntermediateValueModel.stored_repr_to_intermediate_value
    for trial_id, step, value, value_type in inter:
        intermediate[trial_id][step] = stored_to_value(value, value_type)

    trials = []
    for trial_id, number, state, started, completed in rows:
        objectives = trial_values.get(trial_id)
        trials.append(
            FrozenTrial(
                number=number,
                state=state,
                value=None,
                values=[objectives[i] for i in range(len(objectives))] if objectives else None,
                datetime_start=_local(started),
                datetime_complete=_local(completed),
                params=trial_params.get(trial_id, {}),
                distributions=trial_dists.get(trial_id, {}),
                user_attrs=user_attrs.get(trial_id, {}),
                system_attrs=system_attrs.get(trial_id, {}),
                intermediate_values=intermediate.get(trial_id, {}),
                trial_id=trial_id,
            )
        )
    return trials


def read_summary_trials(
    engine: sqlalchemy.engine.Engine,
    study_id: int,
    user_keys: Iterable[str],
    param_names: Iterable[str] = (),
    system_keys: Iterable[str] = (),
) -> list[FrozenTrial]:
    """Trials for a summary: number, state, values, only the named user attributes and params.

    Reports over tens of thousands of trials need neither parameters nor intermediate values,
    and only a few small attributes: leaving the rest in the database makes ``search report``
    several times faster.

    Args:
        engine: The storage's engine.
        study_id: Study id.
        user_keys: User attribute keys to read.
        param_names: Parameters to read.
        system_keys: System attribute keys to read (e.g. ``retry_history``).

    Returns:
        Frozen trials ordered by trial id (no intermediate values).
    """
    t = tables.TrialModel.__table__
    ua = tables.TrialUserAttributeModel.__table__
    sa = tables.TrialSystemAttributeModel.__table__
    tv = tables.TrialValueModel.__table__
    tp = tables.TrialParamModel.__table__
    selected = sqlalchemy.select(t.c.trial_id).where(t.c.study_id == study_id)
    with engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.select(
                t.c.trial_id, t.c.number, t.c.state, t.c.datetime_start, t.c.datetime_complete
            )
            .where(t.c.study_id == study_id)
            .order_by(t.c.trial_id)
        ).all()
        values = conn.execute(
            sqlalchemy.select(tv.c.trial_id, tv.c.objective, tv.c.value, tv.c.value_type).where(
                tv.c.trial_id.in_(selected)
            )
        ).all()
        user = conn.execute(
            sqlalchemy.select(ua.c.trial_id, ua.c.key, ua.c.value_json).where(
                ua.c.trial_id.in_(selected), ua.c.key.in_(list(user_keys))
            )
        ).all()
        system = conn.execute(
            sqlalchemy.select(sa.c.trial_id, sa.c.key, sa.c.value_json).where(
                sa.c.trial_id.in_(selected), sa.c.key.in_(list(system_keys))
            )
        ).all()
        params = conn.execute(
            sqlalchemy.select(
                tp.c.trial_id, tp.c.param_name, tp.c.param_value, tp.c.distribution_json
            ).where(tp.c.trial_id.in_(selected), tp.c.param_name.in_(list(param_names)))
        ).all()
    return _assemble(rows, params, values, user, system, ())


def read_user_attr(
    engine: sqlalchemy.engine.Engine, trial_ids: Iterable[int], key: str, *, system: bool = False
) -> dict[int, Any]:
    """One user (or, with ``system``, system) attribute of the given trials: id -> value."""
    model = tables.TrialSystemAttributeModel if system else tables.TrialUserAttributeModel
    ua = model.__table__
    with engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.select(ua.c.trial_id, ua.c.value_json).where(
                ua.c.trial_id.in_(list(trial_ids)), ua.c.key == key
            )
        ).all()
    return {trial_id: json.loads(value_json) for trial_id, value_json in rows}
