"""The storage as a user meets it through the real ``search`` command and a real PostgreSQL.

Every URL form works for run, worker, report and storage check; mistakes in the URL are one
line and exit 2 at once, without waiting for the server; an unreachable server is reported after
``$SEARCH_CONNECT_TIMEOUT``; read-only commands create nothing; placeholder passwords are
refused; the dashboard serves. Trials use a fake objective (``tests/fixtures``), so the
commands, studies and storage are real and only training is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from _cli import run_search
from _factories import fresh_pg_database
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from storage import classify
from storage import create_storage
from storage._classify import sqlstate
from storage._url import normalize_url

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SPEC = FIXTURES / "tiny_workers.yaml"
OBJECTIVE = "storage_objective:train"


def search(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``search ARGS`` as a user would, its cache under ``cwd``."""
    return run_search(
        *args, cwd=cwd, env={"SEARCH_CACHE": str(cwd / "cache"), **(env or {})}, timeout=timeout
    )


def one_line_exit_2(proc: subprocess.CompletedProcess[str]) -> str:
    """Assert the command failed with exit 2 and one line (no traceback); return the line."""
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def trial_args(study: str, n_trials: int) -> list[str]:
    return [
        "--spec",
        str(SPEC),
        "--objective",
        OBJECTIVE,
        "--n-trials",
        str(n_trials),
        "--study-name",
        study,
        "--device",
        "cpu",
    ]


@pytest.fixture(scope="module")
def db_url(pg_url: str) -> Iterator[str]:
    """A fresh database of its own, as a plain ``postgresql://`` URL; dropped afterwards."""
    with fresh_pg_database(pg_url, "search_test_urls") as url:
        yield make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _form(url: str, scheme: str) -> str:
    return scheme + "://" + url.partition("://")[2]


@pytest.mark.postgres
@pytest.mark.parametrize(
    "scheme", ["postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"]
)
def test_every_url_form_works_for_run_worker_report_and_check(
    db_url: str, scheme: str, tmp_path: Path
) -> None:
    url = _form(db_url, scheme)
    study = f"urls-{scheme.replace('+', '-')}"
    # The form users type first: run makes the study and one trial, the worker one more. The
    # other forms: the worker alone (run opens the storage through the same engine path), to
    # keep the suite short; report and storage check run for every form.
    commands = [("run", 1), ("worker", 2)] if scheme == "postgresql" else [("worker", 1)]
    for command, budget in commands:
        proc = search(
            command, *trial_args(study, budget), "--set-n-trials", "--storage", url, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "1 trials run by this worker" in proc.stdout
        assert f"study {study} in {normalize_url(url)}" in proc.stdout
    report = search("report", "--study", study, "--json", "--storage", url, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert study in report.stdout and json.loads(report.stdout)
    check = search("storage", "check", "--storage", url, cwd=tmp_path)
    assert check.returncode == 0 and "schema current" in check.stdout, check.stdout
    trials = optuna.load_study(study_name=study, storage=create_storage(db_url)).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * len(commands)


@pytest.mark.postgres
@pytest.mark.parametrize("command", ["report", "check", "run", "worker"])
def test_a_wrong_database_name_is_one_line_exit_2_without_waiting(
    db_url: str, command: str, tmp_path: Path
) -> None:
    url = str(make_url(db_url).set(database="no_such_database_here").render_as_string(False))
    args = {
        "report": ["report", "--study", "s"],
        "check": ["storage", "check"],
        "run": ["run", *trial_args("s", 1)],
        "worker": ["worker", *trial_args("s", 1)],
    }[command]
    # A wait for the server (10 min here) would outlast the timeout: a mistake is not waited on.
    proc = search(
        *args, "--storage", url, cwd=tmp_path, env={"SEARCH_CONNECT_TIMEOUT": "600"}, timeout=90
    )
    line = one_line_exit_2(proc)
    assert "gave up" not in line and line.startswith("error: cannot use"), line
    assert 'database "no_such_database_here" does not exist' in line
    assert list(tmp_path.iterdir()) == []  # nothing written


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends


@pytest.mark.postgres
@pytest.mark.parametrize("command", ["report", "check", "run"])
def test_an_unreachable_server_is_one_line_exit_2_within_the_connect_timeout(
    command: str, tmp_path: Path
) -> None:
    url = f"postgresql://search:s3cret@127.0.0.1:{_closed_port()}/search"
    args = {
        "report": ["report", "--study", "s"],
        "check": ["storage", "check"],
        "run": ["run", *trial_args("s", 1)],
    }[command]
    proc = search(*args, "--storage", url, cwd=tmp_path, env={"SEARCH_CONNECT_TIMEOUT": "3"})
    line = one_line_exit_2(proc)
    # Waited the 3 s it was given (by its own clock), not the default 20 s, then gave up.
    waited = re.search(r"gave up after ([0-9.]+) s", line)
    assert waited is not None and 3 <= float(waited[1]) < 20, line
    assert "cannot reach postgresql://search:***@127.0.0.1" in line
    assert "Connection refused" in line and "SEARCH_CONNECT_TIMEOUT" in line
    assert "s3cret" not in proc.stdout + proc.stderr


@pytest.mark.postgres
def test_too_many_connections_is_an_outage_waited_out(db_url: str) -> None:
    """A role at its connection limit is refused (53300) until its connections close."""
    role = f"search_limited_{uuid.uuid4().hex[:6]}"
    admin = sqlalchemy.create_engine(db_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 4"))
        for what in ("SCHEMA public", "ALL TABLES IN SCHEMA public"):
            conn.execute(sqlalchemy.text(f"GRANT ALL ON {what} TO {role}"))
        conn.execute(sqlalchemy.text(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"))
    url = make_url(db_url).set(username=role).render_as_string(False)
    holder = sqlalchemy.create_engine(url, poolclass=NullPool)
    held = [holder.connect() for _ in range(4)]  # the storage needs some: lock and pool

    released = threading.Event()

    def close_all() -> None:
        released.set()
        for conn in held:
            conn.close()

    release = threading.Timer(2.0, close_all)
    try:
        release.start()
        store = create_storage(url, heartbeat_interval=None)
        # Connected only after the role's connections began to close: refused, then retried.
        assert released.is_set(), "connected while the role was at its connection limit"
        with admin.connect() as conn:
            studies = conn.execute(sqlalchemy.text("SELECT count(*) FROM studies")).scalar()
        assert len(store.get_all_studies()) == studies  # it works as that role now
        store.engine.dispose()
    finally:
        release.cancel()
        close_all()
        holder.dispose()
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP OWNED BY {role}"))
            conn.execute(sqlalchemy.text(f"DROP ROLE {role}"))
        admin.dispose()


@pytest.mark.postgres
def test_real_server_errors_are_classified_by_their_sqlstate(db_url: str) -> None:
    """An administrator's disconnect is an outage (57P01); a missing privilege is not (42501)."""
    engine = sqlalchemy.create_engine(db_url, poolclass=NullPool)
    role = f"search_noread_{uuid.uuid4().hex[:6]}"
    with engine.connect() as admin:
        admin.execute(sqlalchemy.text("CREATE TABLE IF NOT EXISTS private_t (x int)"))
        admin.execute(sqlalchemy.text(f"CREATE ROLE {role} LOGIN"))
        admin.commit()
    try:
        victim = engine.connect()
        pid = victim.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
        with engine.connect() as admin:  # a connection of this test's own database
            admin.execute(sqlalchemy.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(sqlalchemy.exc.DBAPIError) as cut:
            victim.execute(sqlalchemy.text("SELECT 1"))
        victim.close()
        assert classify(cut.value) == "transient", cut.value
        assert sqlstate(cut.value) == "57P01"  # psycopg 3 gives it (psycopg2: none, by text)
        reader = sqlalchemy.create_engine(make_url(db_url).set(username=role), poolclass=NullPool)
        with pytest.raises(sqlalchemy.exc.DBAPIError) as denied, reader.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT * FROM private_t"))
        reader.dispose()
        assert sqlstate(denied.value) == "42501" and classify(denied.value) == "permanent"
    finally:
        with engine.connect() as admin:
            admin.execute(sqlalchemy.text("DROP TABLE private_t"))
            admin.execute(sqlalchemy.text(f"DROP ROLE {role}"))
            admin.commit()
        engine.dispose()


def _without_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``search ARGS`` in a Python where ``module`` cannot be imported (as if not installed)."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; sys.argv[0] = 'search'; "
        "from search.cli import app; app()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.mark.postgres
def test_a_psycopg2_url_without_psycopg2_names_the_package(db_url: str, tmp_path: Path) -> None:
    url = _form(db_url, "postgresql+psycopg2")
    proc = _without_module("psycopg2", "storage", "check", "--storage", url, cwd=tmp_path)
    line = one_line_exit_2(proc)
    assert "needs the psycopg2 driver" in line and "pip install psycopg2-binary" in line


@pytest.mark.parametrize("args", [["report", "--study", "x"], ["storage", "check"]])
def test_read_only_commands_never_create_a_database(tmp_path: Path, args: list[str]) -> None:
    proc = search(*args, cwd=tmp_path)  # the default: search.db in the working directory
    line = one_line_exit_2(proc)
    assert f"no database file {tmp_path.resolve() / 'search.db'}" in line
    assert list(tmp_path.iterdir()) == []  # neither search.db nor search.db.lock


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://search:change-me@db.example:5432/search",
        "postgresql://search:postgres@10.0.0.5/search",
        "postgresql://search@db.example:5432/search",  # no password for a remote host
    ],
)
@pytest.mark.parametrize("command", ["worker", "dashboard"])
def test_worker_and_dashboard_refuse_placeholder_or_missing_passwords(
    tmp_path: Path, url: str, command: str
) -> None:
    args = ["worker", *trial_args("s", 1)] if command == "worker" else ["dashboard"]
    secret = tmp_path / "storage_url"
    secret.write_text(url + "\n")
    # Refused before any connection: a wait for the server (10 min) would outlast the timeout.
    env = {"SEARCH_STORAGE_FILE": str(secret), "PGPASSWORD": "", "HOME": str(tmp_path)}
    env["SEARCH_CONNECT_TIMEOUT"] = "600"
    proc = search(*args, cwd=tmp_path, env=env, timeout=90)
    line = one_line_exit_2(proc)
    assert "openssl rand -hex 24" in line
    assert "change-me@" not in line and ":postgres@" not in line


def test_a_missing_storage_file_is_one_line_naming_variable_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "secrets" / "storage_url"
    proc = search(
        "report", "--study", "x", cwd=tmp_path, env={"SEARCH_STORAGE_FILE": str(missing)}
    )
    assert one_line_exit_2(proc).endswith(f"$SEARCH_STORAGE_FILE={missing}: no such file")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_dashboard_serves_the_study_from_the_storage_file(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    optuna.create_study(storage=f"sqlite:///{db}", study_name="dash-study-한국어")
    secret = tmp_path / "storage_url"
    secret.write_text(f"sqlite:///{db}\n")
    port = _free_port()
    env = {**os.environ, "SEARCH_STORAGE_FILE": str(secret)}
    env.pop("SEARCH_STORAGE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "dashboard", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body, deadline = None, time.monotonic() + 60
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/studies", timeout=5
                ) as resp:
                    assert resp.status == 200
                    body = resp.read().decode()
            except OSError:
                time.sleep(0.3)
        assert body is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert "dash-study-한국어" in json.dumps(json.loads(body), ensure_ascii=False)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out  # SIGTERM ends it cleanly (as docker stop does)
    assert "Traceback" not in out


def test_dashboard_without_optuna_dashboard_says_what_to_install(tmp_path: Path) -> None:
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'd.db'}")
    url = f"sqlite:///{tmp_path / 'd.db'}"
    proc = _without_module("optuna_dashboard", "dashboard", "--storage", url, cwd=tmp_path)
    line = one_line_exit_2(proc)
    # a dependency now: a partial install, reinstalled the way this one was (a clone: -e DIR)
    assert f"pip install -e {ROOT}" in line or "pip install ko-retrieval-search" in line, line


def test_report_again_hint_is_shell_quoted_and_runs(tmp_path: Path) -> None:
    """The hint's study name and URL survive the shell: pasted as printed, it reports."""
    where = tmp_path / "my studies"
    where.mkdir()
    url = f"sqlite:///{where / 'a b.db'}"
    run = search("run", *trial_args("quoted", 1), "--storage", url, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    hint = run.stdout.replace("\n", "").split("Report again: ")[1].strip()
    assert f"--storage {shlex.quote(url)}" in hint
    args = shlex.split(hint)
    assert args[:2] == ["search", "report"]
    again = search(*args[1:], cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "multilingual-minilm" in again.stdout or "quoted" in again.stdout
