"""The README's password promises, checked on everything a real study leaves behind.

A password holding ``/ ? # @ : %`` (percent-encoded in the URL, as a user must write it) goes
through the real ``search run``, ``report`` (a good and a failing one) and
``storage check`` against a real PostgreSQL, with every logger at DEBUG. Then the password,
in every spelling, must not appear in any output or log line, in the study's or trials'
attributes, in the database (``pg_dump``), or in any file the commands wrote.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote
from urllib.parse import quote_plus

import optuna
import pytest
from _factories import fresh_pg_database
from sqlalchemy.engine import make_url
from test_storage_cli import search
from test_storage_cli import trial_args

from storage import check_storage
from storage import create_storage
from storage import redact_url

pytestmark = pytest.mark.postgres

# Every logger at DEBUG (optuna, sqlalchemy, psycopg, ours), then the real CLI.
LOUD = (
    "import logging, sys; logging.basicConfig(level=logging.DEBUG, stream=sys.stderr); "
    "sys.argv[0] = 'search'; from search.cli import app; app()"
)


def _forms(password: str, token: str) -> list[str]:
    """Every spelling of the password that could leak, and its unique core."""
    return [password, quote(password, safe=""), quote_plus(password), token]


@pytest.fixture(scope="module")
def secret_db(pg_url: str) -> Iterator[tuple[str, str, str]]:
    """(URL with an odd password, the password, its unique token) on a fresh database.

    The test server trusts local connections, so any password connects: the point is where
    the URL's password travels, not the server's check of it.
    """
    token = uuid.uuid4().hex[:12]
    password = f"pw/{token}?#@:%x"
    with fresh_pg_database(pg_url, "search_test_secret") as fresh:
        db = make_url(fresh)
        url = (
            f"postgresql://{db.username}:{quote(password, safe='')}@{db.host}:"
            f"{db.port or 5432}/{db.database}"
        )
        yield url, password, token


def _loud(*args: str, cwd: Path, env: dict[str, str]) -> str:
    """A real CLI run with every logger at DEBUG; its stdout and stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", LOUD, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.stdout + proc.stderr


def test_the_password_appears_nowhere(
    secret_db: tuple[str, str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, password, token = secret_db
    forms = _forms(password, token)
    assert make_url(url).password == password
    secret_file = tmp_path / "storage_url"
    secret_file.write_text(url + "\n")
    study = "secrets"
    outputs: dict[str, str] = {}

    # The recommended way for run and worker (one code path): the URL in a file; then on
    # the command line, as a user might.
    run = search(
        "run", *trial_args(study, 1), cwd=tmp_path, env={"SEARCH_STORAGE_FILE": str(secret_file)}
    )
    assert run.returncode == 0, run.stdout + run.stderr
    outputs["run"] = run.stdout + run.stderr
    shown = redact_url(url)
    assert f"study {study} in {shown}" in run.stdout
    # The URL came from the secret file: the hint leaves --storage to the same environment.
    hint = run.stdout.replace("\n", "").split("Report again: ")[1]
    assert hint.startswith(f"search report --study {study}") and "--storage" not in hint
    env = {**_clean_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    outputs["report"] = _loud("report", "--study", study, "--storage", url, cwd=tmp_path, env=env)
    assert "multilingual-minilm" in outputs["report"]
    outputs["report-missing"] = _loud(
        "report", "--study", "nope", "--storage", url, cwd=tmp_path, env=env
    )
    assert "no such study" in outputs["report-missing"]
    outputs["check"] = _loud("storage", "check", "--storage", url, cwd=tmp_path, env=env)
    assert "schema current" in outputs["check"]
    closed = url.replace(f":{make_url(url).port}/", ":1/")
    outputs["unreachable"] = _loud(
        "report", "--study", study, "--storage", closed, cwd=tmp_path,
        env={**env, "SEARCH_CONNECT_TIMEOUT": "2"},
    )  # fmt: skip
    assert "cannot reach" in outputs["unreachable"]

    # In-process: every log record of the storage layer, including a retried outage.
    with caplog.at_level(logging.DEBUG):
        create_storage(url, heartbeat_interval=1)
        assert check_storage(url).ok
        assert not check_storage(closed).reachable
    outputs["log records"] = "\n".join(r.getMessage() for r in caplog.records)

    for what, text in outputs.items():
        for form in forms:
            assert form not in text, f"{what} shows the password ({form!r})"

    loaded = optuna.load_study(study_name=study, storage=create_storage(url))
    attrs = [loaded.user_attrs, loaded._storage.get_study_system_attrs(loaded._study_id)]
    for trial in loaded.trials:
        attrs += [trial.user_attrs, trial.system_attrs, trial.params]
    assert len(loaded.trials) == 1
    for form in forms:
        assert form not in repr(attrs), "a study or trial attribute holds the password"

    dump = _pg_dump(url)
    assert "secrets" in dump  # the dump has the study
    for form in forms:
        assert form not in dump, "the database holds the password"

    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != secret_file]
    for path in written:  # whatever the commands wrote (cache, anything else)
        data = path.read_bytes()
        for form in forms:
            assert form.encode() not in data, f"{path} holds the password"


def _clean_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for name in ("SEARCH_STORAGE", "SEARCH_STORAGE_FILE"):
        env.pop(name, None)
    return env


def _pg_dump(url: str) -> str:
    """The whole database as SQL text (``pg_dump``), connecting without the password."""
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        pytest.fail("pg_dump is needed to check the database for the password")
    parsed = make_url(url)
    proc = subprocess.run(
        [
            pg_dump,
            "-h",
            str(parsed.host),
            "-p",
            str(parsed.port or 5432),
            "-U",
            str(parsed.username),
            "--data-only",
            str(parsed.database),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout
