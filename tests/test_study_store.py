"""Tests of search/worker/study_store.py: load or create a study once, even under a crowd."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from _factories import PG_URL
from sqlalchemy.pool import NullPool

from search.worker.study_store import StudyConflictError
from search.worker.study_store import open_study
from storage import create_storage
from storage import redact_url

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fixtures" / "fake_worker.py"


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


@pytest.mark.postgres
def test_ten_processes_at_the_same_second_create_the_study_once(
    fresh_pg_url: str, tmp_path: Path
) -> None:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                fresh_pg_url,
                "crowd",
                "--n-trials",
                "10",
                "--seconds",
                "0",
                "--barrier",
                str(tmp_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(10)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.iterdir())) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)  # every process has imported and waits at the barrier
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=180) for p in procs]
    errors = [err for (out, err), p in zip(results, procs, strict=True) if p.returncode != 0]
    assert errors == []
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert sum(s["created"] for s in summaries) == 1
    store = create_storage(fresh_pg_url)
    assert [s.study_name for s in optuna.get_all_study_summaries(store)] == ["crowd"]
    study = optuna.load_study(study_name="crowd", storage=store)
    assert len(study.trials) == 10
    baselines = [t for t in study.trials if "fixed_params" in t.system_attrs]
    assert len(baselines) == 1  # on_create ran once
