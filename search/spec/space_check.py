"""Refuse to add trials from one search space to a study that was created from another.

A study stores the spec it was created from (study user attribute ``spec``). Only the parts
that define the search are compared: the study's direction and metric, the models (names and
order: they are the ``model`` parameter's choices) and the whole ``space`` (choices, ranges,
log scales, per-model conditions). Training settings, data paths, model paths and memory
savers, sampler, pruner and budget may change between runs (the budget has its own check,
``--set-n-trials``).

Example:
    >>> from search.spec.load import load_spec
    >>> from search.spec.study_spec import shipped_spec_path
    >>> spec = load_spec(shipped_spec_path("ko-retrieval"))
    >>> stored = spec.public_dict()
    >>> stored["space"]["batch_size"] = [32, 64]
    >>> space_differences(stored, spec)
    ['space.batch_size [32, 64], the spec has [32, 64, 128, 256]']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Any

from search.record.stored_spec import store_spec
from search.record.stored_spec import stored_spec
from search.spec.study_spec import SpecError
from search.spec.study_spec import StudySpec

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

_ABSENT = object()
CONDITIONAL_PARAMS = ("batch_size", "max_len")  # choices that depend on the model


def int_range(choices: list[int]) -> tuple[int, int, int, bool]:
    """``(low, high, step, log)`` of the shared integer parameter over ``choices``.

    Evenly spaced choices give a stepped range (one choice: low == high), others a log scale
    (``search.sampling.sampler`` rounds each proposal to a model's choice).

    >>> int_range([128, 256, 384, 512]), int_range([32, 64, 128, 256]), int_range([128])
    ((128, 512, 128, False), (32, 256, 1, True), (128, 128, 1, False))
    """
    ordered = sorted(choices)
    steps = {b - a for a, b in zip(ordered, ordered[1:], strict=False)}
    if len(steps) <= 1:
        return ordered[0], ordered[-1], steps.pop() if steps else 1, False
    return ordered[0], ordered[-1], 1, True


def _search_part(spec: dict[str, Any]) -> dict[str, Any]:
    """The flattened fields of a spec dict that define the search."""
    study = spec.get("study", {})
    space = spec.get("space", {})
    part: dict[str, Any] = {
        "study.direction": study.get("direction"),
        "study.metric": study.get("metric"),
        "models": list(spec.get("models", {})),
    }
    for key, value in space.items():
        if key != "conditions":
            part[f"space.{key}"] = value
    for model, cond in (space.get("conditions") or {}).items():
        for key, value in cond.items():
            if value is not None:
                part[f"space.conditions.{model}.{key}"] = value
    return part


def _show(value: object) -> str:
    if value is _ABSENT:
        return "nothing"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def space_differences(stored: dict[str, Any], spec: StudySpec) -> list[str]:
    """``field OLD, the spec has NEW`` for each search-defining field that differs."""
    old, new = _search_part(stored), _search_part(spec.public_dict())
    keys = [*new, *(k for k in old if k not in new)]
    return [
        f"{key} {_show(old.get(key, _ABSENT))}, the spec has {_show(new.get(key, _ABSENT))}"
        for key in keys
        if old.get(key, _ABSENT) != new.get(key, _ABSENT)
    ]


def _distributions(spec: dict[str, Any]) -> tuple[dict[str, list[Any]], dict[str, bool]]:
    """The categorical parameters' choices and the numeric parameters' log flags of a spec dict.

    The names follow ``search.sampling.space.sample_params``: ``model`` is categorical;
    ``batch_size`` and ``max_len`` are integers over the space's full choices (``int_range``: only
    their log scale must stay, the sampler keeps each model's conditions).
    """
    space = spec.get("space", {})
    choices: dict[str, list[Any]] = {"model": list(spec.get("models", {}))}
    logs = {
        name: bool(rng.get("log", False))
        for name, rng in space.items()
        if isinstance(rng, dict) and name != "conditions"
    }
    for field in CONDITIONAL_PARAMS:
        values = list(space.get(field) or [])
        if values:
            logs[field] = int_range(values)[3]
    return choices, logs


def branch_named_params(param_names: Iterable[str]) -> list[str]:
    """The per-model names (``batch_size.bge-m3-ko``) among ``param_names``, sorted.

    >>> branch_named_params(["model", "batch_size.bge-m3-ko", "lr", "max_len.bge-m3-ko"])
    ['batch_size.bge-m3-ko', 'max_len.bge-m3-ko']
    """
    prefixes = tuple(f"{field}." for field in CONDITIONAL_PARAMS)
    return sorted({name for name in param_names if name.startswith(prefixes)})


def check_param_names(
    study_name: str, param_names: Iterable[str], spec: StudySpec, *, force: bool
) -> None:
    """Refuse to add shared-name trials to a study sampled with per-model names only.

    Studies created before the shared names have ``batch_size.<model>`` / ``max_len.<model>``
    parameters. New trials would sample ``batch_size`` and ``max_len``: Optuna accepts them,
    but TPE and the dashboard would see two unrelated sets of parameters. ``force`` continues
    such a study anyway; once it has a shared-name trial it is not refused again.

    Raises:
        SpecError: The study has per-model names, none of the shared ones, and no ``force``.
    """
    names = set(param_names)
    branch = branch_named_params(names)
    if not branch or force or names & set(CONDITIONAL_PARAMS):
        return
    shown = ", ".join(branch[:2]) + (", ..." if len(branch) > 2 else "")
    raise SpecError(
        f"{spec.source or 'the spec'}: study {study_name!r} was sampled with per-model "
        f"parameter names ({shown}); this version samples shared batch_size and max_len, "
        "which TPE would learn apart from its trials: use another --study-name, or "
        "--force-space to continue it"
    )


def optuna_conflicts(stored: dict[str, Any], spec: StudySpec) -> list[str]:
    """Parameters Optuna refuses to sample differently in one study (changed choices or log).

    Optuna raises "CategoricalDistribution does not support dynamic value space" for a
    categorical parameter whose choices (or their order) changed, and refuses a float
    parameter whose log scale changed.
    """
    old_choices, old_logs = _distributions(stored)
    new_choices, new_logs = _distributions(spec.public_dict())
    conflicts = [
        name
        for name in new_choices
        if name in old_choices and old_choices[name] != new_choices[name]
    ]
    conflicts += [
        f"{name} (log scale)"
        for name in new_logs
        if name in old_logs and old_logs[name] != new_logs[name]
    ]
    return conflicts


def compare_stored_space(
    study_name: str, stored: dict[str, Any] | None, spec: StudySpec, *, force: bool
) -> bool:
    """Raise SpecError when the stored spec's search differs from ``spec``'s.

    Returns:
        True when the spaces differ and ``force`` allows it (the caller stores the new spec).

    Raises:
        SpecError: The spaces differ and ``force`` is off, or they differ in a way Optuna cannot
            mix in one study (even with ``force``).
    """
    if stored is None:
        return False
    diffs = space_differences(stored, spec)
    if not diffs:
        return False
    where = spec.source or "the spec"
    head = f"{where}: study {study_name!r} was created with " + "; ".join(diffs)
    conflicts = optuna_conflicts(stored, spec)
    if conflicts:
        raise SpecError(
            f"{head}. Optuna cannot change the choices or scale of {', '.join(conflicts)} in an "
            "existing study (not even with --force-space): use another --study-name"
        )
    if not force:
        raise SpecError(
            f"{head}. Use another --study-name, restore the spec, or pass --force-space to add "
            "trials from the new space to this study"
        )
    return True


def check_stored_space(
    storage_url: str,
    study_name: str,
    spec: StudySpec,
    *,
    force: bool,
    storage: BaseStorage | None = None,
) -> None:
    """Compare an existing study's stored spec with ``spec`` (see ``compare_stored_space``).

    ``storage``: the run's storage, opened once by the caller (``search run`` passes it on to
    the worker); None: opened here and closed again, only when it can hold the study (a
    missing SQLite file cannot, and is not created here). With ``force`` and a differing
    space, the study stores the new spec. A study sampled with per-model parameter names is
    refused without ``force`` (``check_param_names``).
    """
    if storage is None:
        if missing_sqlite(storage_url):
            return
        from storage import create_storage  # lazy: storage imports optuna and SQLAlchemy

        opened = create_storage(storage_url, heartbeat_interval=None)
        try:
            check_stored_space(storage_url, study_name, spec, force=force, storage=opened)
        finally:
            engine = getattr(opened, "engine", None)
            if engine is not None:
                engine.dispose()
        return
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return
    stored = stored_spec(storage, study_id)
    changed = compare_stored_space(study_name, stored, spec, force=force)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    check_param_names(study_name, (n for t in trials for n in t.params), spec, force=force)
    if changed:
        store_spec(storage, study_id, spec.public_dict())


def missing_sqlite(url: str) -> bool:
    """Whether ``url`` is a SQLite URL whose file does not exist yet (nothing to check there)."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - the storage layer reports a bad URL itself
        return False
    if not parsed.get_backend_name().startswith("sqlite"):
        return False
    database = parsed.database or ""
    return database in ("", ":memory:") or not Path(database).exists()
