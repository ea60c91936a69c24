"""Load or create a study, race-free when many workers start at the same second."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage

from search.record import attrs
from search.record.trial_record import config_of
from search.train.tiny_layout import MARKER
from storage import StorageError
from storage import compat
from storage import named_lock

INITIALIZED = attrs.STUDY_INITIALIZED  # study system attr: on_create finished


class StudyConflictError(StorageError):
    """The stored study does not match what was asked (e.g. its direction); one line."""


class ReplicaMixError(StudyConflictError):
    """A ``--tiny`` run on a study of real weights, or a real run on a study of replicas."""


def open_study(
    storage: BaseStorage,
    name: str,
    *,
    direction: str,
    sampler: BaseSampler | None,
    pruner: BasePruner | None,
    on_create: Callable[[optuna.Study], None] | None = None,
    replicas: bool | None = None,
) -> tuple[optuna.Study, bool]:
    """Load the study ``name``, or create it and run ``on_create`` exactly once.

    Creation and ``on_create`` (enqueue baselines, store spec and budget) run under a lock
    named after the study, shared by all processes on the storage; the others wait for it and
    then load a fully initialised study. If the creating process died inside ``on_create``,
    the next one to open the study runs ``on_create`` again (the study is marked initialised
    only after it returns).

    Example:
        >>> study, created = open_study(
        ...     optuna.storages.InMemoryStorage(), "demo", direction="maximize",
        ...     sampler=None, pruner=None)
        >>> created
        True

    Args:
        storage: From ``storage.create_storage``.
        name: Study name.
        direction: ``maximize`` or ``minimize``.
        sampler: The study's sampler.
        pruner: The study's pruner.
        on_create: Called with the new study in the one process that initialises it.
        replicas: True for a ``--tiny`` run, False for real weights: checked against what the
            study holds (``replica_study``) and recorded on it; None: neither.

    Returns:
        ``(study, created)``: ``created`` is True in the process that ran ``on_create``.

    Raises:
        StudyConflictError: The stored study's direction differs from ``direction``.
        ReplicaMixError: ``replicas`` differs from what the study's trials trained.
    """
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', but got {direction=}.")
    with named_lock(storage, f"open:{name}"):
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction=direction,  # type: ignore[arg-type]  # checked above
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
        stored = study.direction.name.lower()
        if stored != direction:
            raise StudyConflictError(
                f"study {name!r} exists with direction {stored}, not {direction}: "
                f"use another --study-name"
            )
        study_id, cached = compat.study_id(study), compat.study_storage(study)
        if replicas is not None:
            check_replicas(cached, name, replicas)  # under the lock: no other run mixes in
            cached.set_study_system_attr(study_id, attrs.STUDY_REPLICAS, replicas)
        if cached.get_study_system_attrs(study_id).get(INITIALIZED):
            return study, False
        if on_create is not None:
            on_create(study)
        cached.set_study_system_attr(study_id, INITIALIZED, True)
        return study, True


def is_replica_path(path: str) -> bool:
    """Whether a trial's ``model_path`` is a tiny replica (its marker, else its name).

    Example:
        >>> is_replica_path("/c/tiny/ko-simcse-tiny-L2-H64"), is_replica_path("BM-K/KoSimCSE")
        (True, False)
    """
    where = Path(path)
    named = where.parent.name == "tiny" and "-tiny-L" in where.name  # the cache's layout
    return named or (where / MARKER).is_file()


def replica_study(storage: BaseStorage, study_id: int) -> bool | None:
    """Whether the study's trials train tiny replicas: its record, else (studies from before
    the record) the model path of its first trial with a config; None: no record, no trial."""
    recorded = storage.get_study_system_attrs(study_id).get(attrs.STUDY_REPLICAS)
    if isinstance(recorded, bool):
        return recorded
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        path = (config_of(trial) or {}).get("model_path")
        if isinstance(path, str) and path:
            return is_replica_path(path)
    return None


def replica_of(study: optuna.Study) -> bool:
    """Whether ``study``'s trials train tiny replicas (``replica_study``; unknown: False)."""
    return bool(replica_study(compat.study_storage(study), compat.study_id(study)))


def check_replicas(storage: BaseStorage, name: str, tiny: bool) -> None:
    """Refuse to mix replica and real-weights trials in the study ``name`` (absent: fine).

    A study recorded as real weights but still without trials takes a ``--tiny`` run.

    Raises:
        ReplicaMixError: One line naming the study and the flag.
    """
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return
    held = replica_study(storage, study_id)
    if held is None or held == tiny:
        return
    if held:
        raise ReplicaMixError(
            f"study {name!r} holds tiny-replica trials (search run --tiny): add --tiny to "
            "continue it, or use another --study-name for the real weights"
        )
    if storage.get_all_trials(study_id, deepcopy=False):
        raise ReplicaMixError(
            f"study {name!r} holds real-weights trials: --tiny would mix replicas into it; "
            "drop --tiny, or use another --study-name"
        )
