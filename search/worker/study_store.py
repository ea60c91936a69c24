"""Load or create a study, race-free when many workers start at the same second."""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage

from search.record import attrs
from storage import StorageError
from storage import compat
from storage import named_lock

INITIALIZED = attrs.STUDY_INITIALIZED  # study system attr: on_create finished


class StudyConflictError(StorageError):
    """The stored study does not match what was asked (e.g. its direction); one line."""


def open_study(
    storage: BaseStorage,
    name: str,
    *,
    direction: str,
    sampler: BaseSampler | None,
    pruner: BasePruner | None,
    on_create: Callable[[optuna.Study], None] | None = None,
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

    Returns:
        ``(study, created)``: ``created`` is True in the process that ran ``on_create``.

    Raises:
        StudyConflictError: The stored study's direction differs from ``direction``.
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
        if cached.get_study_system_attrs(study_id).get(INITIALIZED):
            return study, False
        if on_create is not None:
            on_create(study)
        cached.set_study_system_attr(study_id, INITIALIZED, True)
        return study, True
