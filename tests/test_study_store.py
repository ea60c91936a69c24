"""Tests of search/worker/study_store.py: load or create a study once, even under a crowd."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from _cli_workers import WorkerProcess
from _cli_workers import assert_budget_spent_exactly
from _cli_workers import stop_all
from _cli_workers import study_trials
from _cli_workers import wait_for
from _factories import PG_URL
from optuna.storages import RDBStorage
from sqlalchemy.pool import NullPool

from search.record import attrs
from search.worker.study_store import StudyConflictError
from search.worker.study_store import open_study
from storage import create_storage
from storage import named_lock
from storage import redact_url

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A brand-new PostgreSQL database (no tables yet), dropped afterwards."""
    url = sqlalchemy.engine.make_url(PG_URL)
    admin = sqlalchemy.create_engine(
        url.set(database="postgres"),
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 3},
    )
    name = f"search_test_crowd_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.SQLAlchemyError as exc:
        pytest.skip(f"PostgreSQL unreachable at {redact_url(PG_URL)} (SEARCH_TEST_PG_URL): {exc}")
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _open(store: optuna.storages.BaseStorage, calls: list[str], name: str = "s") -> bool:
    _, created = open_study(
        store,
        name,
        direction="maximize",
        sampler=None,
        pruner=None,
        on_create=lambda study: calls.append(study.study_name),
    )
    return created


def test_created_once_then_loaded(tmp_path: Path) -> None:
    store = create_storage(f"sqlite:///{tmp_path}/s.db")
    calls: list[str] = []
    assert _open(store, calls) is True
    assert _open(store, calls) is False
    assert _open(create_storage(f"sqlite:///{tmp_path}/s.db"), calls) is False
    assert calls == ["s"]


def test_an_interrupted_on_create_is_completed_by_the_next_process(tmp_path: Path) -> None:
    store = create_storage(f"sqlite:///{tmp_path}/s.db")

    def crash(study: optuna.Study) -> None:
        raise RuntimeError("killed while enqueueing baselines")

    with pytest.raises(RuntimeError):
        open_study(store, "s", direction="maximize", sampler=None, pruner=None, on_create=crash)
    calls: list[str] = []
    assert _open(store, calls) is True
    assert calls == ["s"]


def test_direction_conflict_is_an_error(tmp_path: Path) -> None:
    store = create_storage(f"sqlite:///{tmp_path}/s.db")
    _open(store, [])
    with pytest.raises(StudyConflictError, match="direction maximize"):
        open_study(store, "s", direction="minimize", sampler=None, pruner=None)
    with pytest.raises(ValueError, match="direction"):
        open_study(store, "t", direction="up", sampler=None, pruner=None)


def test_open_study_records_replicas_and_refuses_the_other_kind(tmp_path: Path) -> None:
    """Under the study's lock (two workers starting together): the record is written by the
    first open, and an open of the other kind is refused once the study has trials."""
    from search.worker.study_store import ReplicaMixError
    from search.worker.study_store import replica_study

    store = create_storage(f"sqlite:///{tmp_path}/s.db")
    kw = {"direction": "maximize", "sampler": None, "pruner": None}
    study, _ = open_study(store, "s", replicas=False, **kw)  # type: ignore[arg-type]
    study_id = study._study_id
    assert replica_study(store, study_id) is False
    open_study(store, "s", replicas=True, **kw)  # type: ignore[arg-type]  # no trials yet
    assert replica_study(store, study_id) is True
    trial = study.ask()
    store.set_trial_system_attr(
        trial._trial_id, attrs.SYSTEM_CONFIG, {"model_path": "/c/tiny/m-tiny-L2-H64"}
    )
    before = store.get_study_system_attrs(study_id)
    with pytest.raises(ReplicaMixError, match="'s' holds tiny-replica trials.*--tiny"):
        open_study(store, "s", replicas=False, **kw)  # type: ignore[arg-type]
    assert store.get_study_system_attrs(study_id) == before  # nothing written


class _LockOnly(RDBStorage):
    """Just the engine of a database, for ``named_lock``: no tables are created or read."""

    def __init__(self, url: str) -> None:  # not super().__init__: that creates the tables
        self.engine = sqlalchemy.create_engine(url, poolclass=NullPool)


def _advisory_locks(engine: sqlalchemy.engine.Engine, *, granted: bool) -> list[tuple[int, ...]]:
    """The advisory locks held (``granted``) or waited for on the engine's database."""
    with engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.text(
                "SELECT classid, objid, objsubid FROM pg_locks WHERE locktype = 'advisory' "
                "AND granted = :granted AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"granted": granted},
        ).all()
    return [tuple(row) for row in rows]


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test started; whatever is left is killed with its trial child."""
    started: list[WorkerProcess] = []
    yield started
    stop_all(started)


@pytest.mark.postgres
def test_ten_processes_at_the_same_second_create_the_study_once(
    fresh_pg_url: str,
    tmp_path: Path,
    workers: list[WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten real ``search worker`` processes on a database with no tables yet, let into the
    study at the same instant: one creates it and enqueues its baseline, all ten share its
    budget of ten exactly.

    The barrier is the study's own open lock (``open_study`` takes ``open:<study>``): the test
    holds it until all ten wait for it in ``pg_locks``, having raced through the schema
    creation on their way, then lets them go together.
    """
    monkeypatch.setenv("SEARCH_LOCK_TIMEOUT", "900")  # the barrier may sit idle a while
    holder = _LockOnly(fresh_pg_url)
    try:
        with named_lock(holder, "open:crowd"):
            [barrier] = _advisory_locks(holder.engine, granted=True)
            workers += [
                WorkerProcess(fresh_pg_url, "crowd", 10, tmp_path, f"w{i}", epoch_s=0.0)
                for i in range(10)
            ]

            def all_waiting() -> bool:
                for worker in workers:
                    assert worker.alive(), worker.stderr()
                return _advisory_locks(holder.engine, granted=False).count(barrier) == 10

            wait_for("ten workers waiting to open the study", all_waiting, 300, every=0.2)
    finally:
        holder.engine.dispose()
    for worker in workers:
        worker.assert_exited_cleanly()
    store = create_storage(fresh_pg_url, heartbeat_interval=None)
    assert [s.study_name for s in optuna.get_all_study_summaries(store)] == ["crowd"]
    trials = study_trials(fresh_pg_url, "crowd")
    assert_budget_spent_exactly(trials, 10, workers)
    assert sum(w.trials_run() for w in workers) == 10
    baselines = [t for t in trials if "fixed_params" in t.system_attrs]
    assert len(baselines) == 1  # on_create ran once (the spec has one model)
    study = optuna.load_study(study_name="crowd", storage=store)
    assert study.user_attrs[attrs.STUDY_N_TRIALS] == 10
