"""CI cannot go green by skipping: the conftest rule, run for real on a generated test file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import sqlalchemy
from _factories import ensure_pg_database
from sqlalchemy.pool import NullPool

TESTS = Path(__file__).resolve().parent
GENERATED = """
import pytest

@pytest.mark.postgres
def test_postgres_marked_skip():
    pytest.skip("server gone")

@pytest.mark.train
def test_train_marked_skip():
    pytest.skip("no weights")

def test_unmarked_skip():
    pytest.skip("an optional extra")

def test_uses_pg_url(pg_url):
    pass

def test_uses_klue(klue_json):
    pass

@pytest.mark.postgres
@pytest.mark.pg_restart
def test_restarts_the_server():
    pass

def test_passes():
    pass
"""


def _run(tmp_path: Path, **env: str) -> tuple[int, dict[str, str], str]:
    """Run pytest on the generated file with the project's conftest; outcome per test."""
    work = tmp_path / uuid.uuid4().hex[:8]
    work.mkdir()
    for name in ("conftest.py", "_factories.py"):
        shutil.copy(TESTS / name, work / name)
    (work / "test_generated.py").write_text(GENERATED)
    markers = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"
    ]["markers"]
    (work / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n" + "".join(f"    {m}\n" for m in markers)
    )
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "SEARCH_TEST_PG_RESTART_OK")}
    base |= {
        "SEARCH_TEST_PG_URL": "postgresql://postgres@127.0.0.1:1/search_test",  # nobody there
        "SEARCH_TEST_SHARED_DATA": str(tmp_path / "no-shared-data"),
    }
    junit = work / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}"],
        cwd=work,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name", "")] = (
            "failed" if {"failure", "error"} & set(kinds) else kinds[0] if kinds else "passed"
        )
    return proc.returncode, outcomes, proc.stdout


def test_without_ci_the_missing_server_and_data_skip(tmp_path: Path) -> None:
    rc, outcomes, out = _run(tmp_path)
    assert rc == 0, out
    assert outcomes == {
        "test_postgres_marked_skip": "skipped",
        "test_train_marked_skip": "skipped",
        "test_unmarked_skip": "skipped",
        "test_uses_pg_url": "skipped",
        "test_uses_klue": "skipped",
        "test_restarts_the_server": "skipped",
        "test_passes": "passed",
    }
    assert "restarts the shared PostgreSQL server: set SEARCH_TEST_PG_RESTART_OK=1" in out


def test_under_ci_a_skipped_must_run_test_fails_with_its_reason(tmp_path: Path) -> None:
    rc, outcomes, out = _run(tmp_path, CI="true")
    assert rc == 1, out
    assert outcomes == {
        "test_postgres_marked_skip": "failed",
        "test_train_marked_skip": "failed",
        "test_unmarked_skip": "skipped",  # the rule covers postgres, train and shared_data only
        "test_uses_pg_url": "failed",  # marked postgres by the fixture it uses
        "test_uses_klue": "failed",  # marked shared_data by the fixture it uses
        "test_restarts_the_server": "failed",  # CI must ask for it
        "test_passes": "passed",
    }
    assert "server gone" in out and "no weights" in out
    assert "PostgreSQL server unreachable at postgresql://postgres@127.0.0.1:1/search_test" in out
    assert f"KLUE-NLI data not found at {tmp_path / 'no-shared-data'}" in out


def test_under_ci_asking_for_the_restart_test_runs_it(tmp_path: Path) -> None:
    rc, outcomes, out = _run(tmp_path, CI="1", SEARCH_TEST_PG_RESTART_OK="1")
    assert rc == 1, out  # the other must-run skips still fail
    assert outcomes["test_restarts_the_server"] == "passed"
    assert outcomes["test_unmarked_skip"] == "skipped"


@pytest.mark.postgres
def test_pg_fixture_creates_a_missing_database(pg_url: str) -> None:
    name = f"search_test_ci_{uuid.uuid4().hex[:8]}"
    url = sqlalchemy.engine.make_url(pg_url)
    missing = url.set(database=name).render_as_string(hide_password=False)
    admin = sqlalchemy.create_engine(
        url.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    exists = sqlalchemy.text("SELECT count(*) FROM pg_database WHERE datname = :n")
    try:
        with admin.connect() as conn:
            assert conn.execute(exists, {"n": name}).scalar() == 0
        assert ensure_pg_database(missing) is None
        with admin.connect() as conn:
            assert conn.execute(exists, {"n": name}).scalar() == 1
        assert ensure_pg_database(missing) is None  # and reuses it the second time
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.postgres
def test_pg_fixture_names_a_refused_role_not_an_unreachable_server(pg_url: str) -> None:
    url = sqlalchemy.engine.make_url(pg_url).set(username="no_such_role_d", database="nodb_d")
    problem = ensure_pg_database(url.render_as_string(hide_password=False))
    assert problem is not None
    assert "refused the connection" in problem and "no_such_role_d" in problem
    assert "unreachable" not in problem
