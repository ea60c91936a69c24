"""Tests of storage/: URLs, redaction, storage settings, heartbeats, retries, check."""

from __future__ import annotations

import sqlite3
import time
import types
import uuid
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest
import sqlalchemy
from alembic import command
from alembic.config import Config
from optuna.exceptions import StorageInternalError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from sqlalchemy.engine import make_url

import storage._heartbeat as heartbeat_module
import storage._retry as retry_module
from storage import ENV_STORAGE
from storage import ENV_STORAGE_FILE
from storage import HeartbeatThread
from storage import ResilientRDBStorage
from storage import StorageError
from storage import check_storage
from storage import classify
from storage import connect_timeout
from storage import create_storage
from storage import default_storage_url
from storage import heartbeat
from storage import is_transient
from storage import redact_url
from storage import resolve_storage_url
from storage._retry import backoff_delays
from storage._retry import call_with_retry

CLOSED_PG = "postgresql://search:s3cret@127.0.0.1:1/search"
# Passwords with every character a URL gives a meaning to, percent-encoded as a user must.
ODD_PASSWORDS = ["a/b?c#d@e:f%g", "s3/cret", "p@ss:w#rd?x", "100%/x"]


@pytest.fixture(autouse=True)
def _short_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreachable servers answer in 2 s here, not the default 30."""
    monkeypatch.setenv("SEARCH_CONNECT_TIMEOUT", "2")


def _old_schema(url: str, revision: str = "v3.0.0.d") -> None:
    """Create Optuna's tables as an older Optuna left them (Alembic up to ``revision``)."""
    here = Path(optuna.__file__).parent / "storages" / "_rdb"
    config = Config(str(here / "alembic.ini"))
    config.set_main_option("script_location", str(here / "alembic"))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, revision)


def test_default_url_is_search_db_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_storage_url() == f"sqlite:///{tmp_path.resolve() / 'search.db'}"
    assert default_storage_url(tmp_path / "sub") == f"sqlite:///{tmp_path / 'sub' / 'search.db'}"


def test_resolve_order_is_value_then_env_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_STORAGE, raising=False)
    assert resolve_storage_url(None) == default_storage_url()
    monkeypatch.setenv(ENV_STORAGE, "sqlite:///env.db")
    assert resolve_storage_url(None) == "sqlite:///env.db"
    assert resolve_storage_url("  ") == "sqlite:///env.db"
    assert resolve_storage_url("sqlite:///given.db") == "sqlite:///given.db"
    assert resolve_storage_url("postgres://u@h/db") == "postgresql://u@h/db"


def test_storage_file_comes_after_the_option_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_STORAGE, raising=False)
    secret = tmp_path / "storage_url"
    secret.write_text("postgres://search:pw@db:5432/search\n")
    monkeypatch.setenv(ENV_STORAGE_FILE, str(secret))
    assert resolve_storage_url(None) == "postgresql://search:pw@db:5432/search"
    monkeypatch.setenv(ENV_STORAGE, "sqlite:///env.db")
    assert resolve_storage_url(None) == "sqlite:///env.db"
    assert resolve_storage_url("sqlite:///given.db") == "sqlite:///given.db"


@pytest.mark.parametrize(("content", "reason"), [(None, "no such file"), (" \n", "empty")])
def test_missing_or_empty_storage_file_is_one_line_naming_variable_and_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, reason: str
) -> None:
    monkeypatch.delenv(ENV_STORAGE, raising=False)
    secret = tmp_path / "storage_url"
    if content is not None:
        secret.write_text(content)
    monkeypatch.setenv(ENV_STORAGE_FILE, str(secret))
    with pytest.raises(StorageError) as info:
        resolve_storage_url(None)
    message = str(info.value)
    assert message.startswith(f"$SEARCH_STORAGE_FILE={secret}: ") and reason in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://search:s3cret@db:5432/search", "postgresql://search:***@db:5432/search"),
        ("postgresql+psycopg2://u:p@ss@h/db", "postgresql+psycopg2://u:***@h/db"),
        (
            "postgresql://u@h/db?sslmode=require&password=x",
            "postgresql://u@h/db?sslmode=require&password=***",
        ),  # noqa: E501
        ("postgresql://h/db", "postgresql://h/db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("sqlite:////data/a@b.db", "sqlite:////data/a@b.db"),
        ("not a url password=x", "not a url password=***"),
        ("postgresql://u:a/b@h/db", "postgresql://u:***@h/db"),  # '/' unencoded
        ("postgresql://u:a/b?c#d@e:f%25g@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:pw@h/db?sslpassword=zz", "postgresql://u:***@h/db?sslpassword=***"),
    ],
)
def test_redact_url_hides_passwords_only(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize("password", ODD_PASSWORDS)
def test_redact_url_hides_passwords_with_url_characters(password: str) -> None:
    encoded = quote(password, safe="")
    url = f"postgresql://search:{encoded}@db.example:5432/search?sslmode=require"
    shown = redact_url(url)
    assert shown == "postgresql://search:***@db.example:5432/search?sslmode=require"
    assert make_url(url).password == password  # what the driver gets
    for form in (password, encoded, *password.split("/"), *encoded.split("%")):
        if len(form) >= 3:
            assert form not in shown


@pytest.mark.parametrize(
    "url",
    ["nonsense", "nosuchdb://u:s3cret@h/db", "postgresql+psycopg2://u:s3cret@h", CLOSED_PG],
)
def test_bad_urls_raise_one_line_storage_error_without_the_password(url: str) -> None:
    with pytest.raises(StorageError) as info:
        create_storage(url, max_wait=0.2)
    message = str(info.value)
    assert "\n" not in message
    assert "s3cret" not in message
    if "://" in url:
        assert redact_url(url) in message


def test_missing_sqlite_directory_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        create_storage(f"sqlite:///{tmp_path}/no/such/dir/x.db")


def test_sqlite_storage_has_heartbeats_retry_callback_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = create_storage(f"sqlite:///{path}", heartbeat_interval=7, grace_period=20, max_retry=2)
    assert isinstance(store, ResilientRDBStorage)
    assert store.get_heartbeat_interval() == 7
    assert store.grace_period == 20
    callback = store.get_heartbeat_stale_trial_callback()
    assert isinstance(callback, RetryHeartbeatStaleTrialCallback)
    assert callback._max_retry == 2
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert create_storage(f"sqlite:///{path}", heartbeat_interval=None).heartbeat_interval is None


def test_invalid_settings_are_value_errors() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval"):
        create_storage("sqlite:///:memory:", heartbeat_interval=0)
    with pytest.raises(ValueError, match="max_retry"):
        create_storage("sqlite:///:memory:", max_retry=-1)


def test_transient_errors_are_retried_and_others_raised_at_once() -> None:
    calls: list[int] = []
    refused = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise StorageInternalError("commit failed") from refused
        return "ok"

    assert call_with_retry(flaky, max_wait=5, what="test") == "ok"
    assert len(calls) == 3

    def broken() -> None:
        calls.append(1)
        raise sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))

    calls.clear()
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        call_with_retry(broken, max_wait=5, what="test")
    assert len(calls) == 1
    assert is_transient(StorageInternalError("x").with_traceback(None)) is False
    assert sum(backoff_delays(3.0)) == pytest.approx(3.0)


def test_heartbeat_context_records_beats(tmp_path: Path) -> None:
    store = create_storage(f"sqlite:///{tmp_path}/h.db", heartbeat_interval=1)
    study = optuna.create_study(storage=store)
    trial = study.ask()
    with heartbeat(study, trial):
        time.sleep(0.3)
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/h.db")
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats")).all()
    assert [r.trial_id for r in rows] == [trial._trial_id]


def test_heartbeat_is_a_noop_without_heartbeats() -> None:
    study = optuna.create_study()  # in-memory storage: no heartbeat
    trial = study.ask()
    with heartbeat(study, trial):
        pass
    assert study.trials[0].state.name == "RUNNING"


class _FlakyHeartbeatStorage(optuna.storages.RDBStorage):
    """Fails the first ``failures`` heartbeats like a restarting database."""

    failures = 2

    def record_heartbeat(self, trial_id: int) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StorageInternalError("server closed the connection unexpectedly")
        super().record_heartbeat(trial_id)


def test_heartbeat_thread_survives_a_database_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(heartbeat_module, "_OUTAGE_RETRY", 0.05)
    store = _FlakyHeartbeatStorage(f"sqlite:///{tmp_path}/f.db", heartbeat_interval=60)
    study = optuna.create_study(storage=store)
    trial = study.ask()
    thread = HeartbeatThread(store, trial._trial_id, 60)
    thread.start()
    deadline = time.monotonic() + 5
    while thread.beats == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    thread.stop()
    assert store.failures == 0
    assert thread.beats == 1
    assert not thread.is_alive()


def test_check_storage_fresh_current_and_old_schema_with_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    with pytest.raises(StorageError, match="no database file"):
        check_storage(url)  # read-only: a missing file is an error, and is not created
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "c.db").touch()
    fresh = check_storage(url)
    assert fresh.reachable and fresh.schema_current and fresh.current_version is None
    _old_schema(url)
    old = check_storage(url)
    assert old.reachable and not old.schema_current
    assert old.current_version == "v3.0.0.d" and "--upgrade" in old.message
    with pytest.raises(StorageError, match="older"):
        create_storage(url)
    upgraded = check_storage(url, upgrade=True)
    assert upgraded.upgraded and upgraded.schema_current
    assert upgraded.current_version == upgraded.head_version
    assert check_storage(url).ok
    create_storage(url)  # usable now


def _record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The retry loop's waits, recorded instead of slept (its clock still runs)."""
    slept: list[float] = []
    clock = types.SimpleNamespace(monotonic=time.monotonic, sleep=slept.append)
    monkeypatch.setattr(retry_module, "time", clock)
    return slept


def test_check_storage_unreachable_says_so_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept = _record_sleeps(monkeypatch)
    status = check_storage(CLOSED_PG)
    assert slept and sum(slept) == pytest.approx(2)  # waited $SEARCH_CONNECT_TIMEOUT=2, no more
    assert not status.reachable and not status.ok
    assert "cannot reach" in status.message and "Connection refused" in status.message
    assert "s3cret" not in status.message and redact_url(CLOSED_PG) in status.message


def test_read_only_open_of_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/search.db"
    with pytest.raises(StorageError, match=f"no database file {tmp_path}/search.db"):
        create_storage(url, heartbeat_interval=None, must_exist=True)
    assert list(tmp_path.iterdir()) == []
    create_storage(url, heartbeat_interval=None)  # a writer creates it
    create_storage(url, heartbeat_interval=None, must_exist=True)


def test_connect_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEARCH_CONNECT_TIMEOUT")
    assert connect_timeout() == 20
    monkeypatch.setenv("SEARCH_CONNECT_TIMEOUT", "4.5")
    assert connect_timeout() == 4.5
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv("SEARCH_CONNECT_TIMEOUT", bad)
        with pytest.raises(StorageError, match="SEARCH_CONNECT_TIMEOUT"):
            connect_timeout()


def _operational(message: str, sqlstate: str | None = None) -> sqlalchemy.exc.OperationalError:
    """An OperationalError as SQLAlchemy wraps a driver's (``sqlstate`` as psycopg 3 has it)."""
    orig = Exception(message)
    orig.sqlstate = sqlstate  # type: ignore[attr-defined]
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, orig)


@pytest.mark.parametrize(
    ("message", "sqlstate", "kind"),
    [
        ("terminating connection due to administrator command", "57P01", "transient"),
        ("the database system is starting up", "57P03", "transient"),
        ("sorry, too many clients already", "53300", "transient"),
        ("could not serialize access", "40001", "transient"),
        ('database "x" does not exist', "3D000", "permanent"),
        ('password authentication failed for user "u"', "28P01", "permanent"),
        ("permission denied for table studies", "42501", "permanent"),
        ("division by zero", "22012", None),  # a statement error: not about the connection
        # Connect-time failures carry no SQLSTATE: the message decides.
        ('connection to server at "h", port 1 failed: Connection refused', None, "transient"),
        ("server closed the connection unexpectedly", None, "transient"),
        ("FATAL:  sorry, too many clients already", None, "transient"),
        ("database is locked", None, "transient"),  # SQLite
        ('FATAL:  database "nosuch" does not exist', None, "permanent"),
        ('FATAL:  role "nobody" does not exist', None, "permanent"),
        ('FATAL:  password authentication failed for user "u"', None, "permanent"),
        ("failed to resolve host 'db.invalid': Name or service not known", None, "permanent"),
        ('could not translate host name "db" to address', None, "permanent"),
        ("server does not support SSL, but SSL was required", None, "permanent"),
    ],
)
def test_errors_are_classified_by_sqlstate_else_by_connect_message(
    message: str, sqlstate: str | None, kind: str | None
) -> None:
    error = _operational(message, sqlstate)
    assert classify(error) == kind
    wrapped = StorageInternalError("commit failed")
    wrapped.__cause__ = error
    assert classify(wrapped) == kind  # Optuna's wrapper is seen through
    assert is_transient(wrapped) is (kind == "transient")


def test_permanent_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    slept = _record_sleeps(monkeypatch)
    calls: list[int] = []

    def no_such_database() -> None:
        calls.append(1)
        raise _operational('FATAL:  database "nosuch" does not exist')

    with pytest.raises(sqlalchemy.exc.OperationalError):
        call_with_retry(no_such_database, max_wait=60, what="test")
    assert calls == [1] and slept == []


@pytest.mark.postgres
def test_postgres_engine_has_pre_ping_and_pool_sizes(pg_url: str) -> None:
    store = create_storage(pg_url, heartbeat_interval=5)
    assert isinstance(store, ResilientRDBStorage)
    assert store.engine.pool._pre_ping is True
    assert store.engine.pool.size() >= 4
    assert store.engine_kwargs["pool_pre_ping"] is True
    assert store.get_heartbeat_interval() == 5
    # The plain URL runs on psycopg 3, and libpq got our settings.
    if "+psycopg2" not in pg_url:
        assert store.engine.dialect.driver == "psycopg"
        with store.engine.connect() as conn:
            params = conn.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        assert params["application_name"] == "search" and params["connect_timeout"] == "10"
        assert (params["keepalives"], params["keepalives_idle"]) == ("1", "30")
    status = check_storage(pg_url)
    assert status.reachable and status.schema_current and status.current_version is not None


@pytest.mark.postgres
def test_postgres_old_schema_is_reported_and_upgraded(pg_db: str) -> None:
    _old_schema(pg_db)
    assert not check_storage(pg_db).schema_current
    assert check_storage(pg_db, upgrade=True).schema_current


def _fill_varied(store: optuna.storages.BaseStorage) -> optuna.Study:
    """Trials in every state with every kind of value, param and attribute."""
    study = optuna.create_study(storage=store, study_name=f"v-{uuid.uuid4().hex[:6]}")
    for i in range(12):
        trial = study.ask()
        trial.suggest_categorical("model", ["a", "b", None])
        trial.suggest_int("batch", 8, 64, log=True)
        trial.suggest_float("lr", 1e-5, 1e-2, log=True)
        trial.suggest_float("step", 0.0, 1.0, step=0.25)
        trial.set_user_attr("config", {"nested": [1, 2, {"x": i}], "s": "한국어"})
        trial.set_user_attr("oom", i % 3 == 0)
        trial.report(float("nan") if i == 4 else float(i), 0)
        trial.report(float("inf"), 1)
        if i % 4 == 0:
            study.tell(trial, float("-inf") if i == 8 else i / 10)
        elif i % 4 == 1:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif i % 4 == 2:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial({"model": "a"})
    return study


def _normal(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    def norm(t: optuna.trial.FrozenTrial) -> str:
        return repr(
            (
                t._trial_id, t.number, t.state, t.values, t.datetime_start, t.datetime_complete,
                sorted(t.params.items(), key=str), sorted(t.distributions.items(), key=str),
                sorted(t.user_attrs.items(), key=str), sorted(t.system_attrs.items(), key=str),
                sorted(t.intermediate_values.items()),
            )
        )  # fmt: skip

    return [norm(t) for t in trials]


def _same_reads(store: ResilientRDBStorage) -> None:
    study = _fill_varied(store)
    sid = study._study_id
    ids = [t._trial_id for t in study.get_trials()]
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING)
    for args in [(None, set(), -1), (done, set(), -1), (None, {ids[1], ids[3]}, ids[5])]:
        fast = store._get_trials(sid, *args)  # type: ignore[arg-type]
        slow = optuna.storages.RDBStorage._get_trials(store, sid, *args)  # type: ignore[arg-type]
        assert len(fast) > 0
        assert _normal(fast) == _normal(slow)
    with pytest.raises(KeyError):
        store._get_trials(10**6, None, set(), -1)


def test_fast_trial_read_equals_optunas_on_sqlite(tmp_path: Path) -> None:
    _same_reads(ResilientRDBStorage(f"sqlite:///{tmp_path}/r.db"))


@pytest.mark.postgres
def test_fast_trial_read_equals_optunas_on_postgres(pg_url: str) -> None:
    store = create_storage(pg_url, heartbeat_interval=None)
    assert isinstance(store, ResilientRDBStorage)
    _same_reads(store)


def test_heartbeat_timing_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEARCH_HEARTBEAT_INTERVAL", "2")
    monkeypatch.setenv("SEARCH_GRACE_PERIOD", "9")
    store = create_storage("sqlite:///:memory:")
    assert isinstance(store, ResilientRDBStorage)
    assert (store.heartbeat_interval, store.grace_period) == (2, 9)
    assert create_storage("sqlite:///:memory:", heartbeat_interval=None).heartbeat_interval is None
    monkeypatch.setenv("SEARCH_GRACE_PERIOD", "soon")
    with pytest.raises(StorageError, match="SEARCH_GRACE_PERIOD"):
        create_storage("sqlite:///:memory:")


def test_many_user_attrs_in_one_call(tmp_path: Path) -> None:
    store = create_storage(f"sqlite:///{tmp_path / 'a.db'}", heartbeat_interval=None)
    study = optuna.create_study(storage=store, study_name="attrs")
    trial = study.ask()
    store.set_trial_user_attrs(trial._trial_id, {"a": 1, "b": {"c": [1, 2]}})
    store.set_trial_user_attrs(trial._trial_id, {"a": 2})
    assert study.trials[0].user_attrs == {"a": 2, "b": {"c": [1, 2]}}


def _attrs_in_one_transaction(url: str) -> None:
    """``set_trial_attrs``: one read of the trial and one upsert per table, whatever the
    number of attributes; the same attributes as Optuna's one-by-one calls; a finished
    trial refused as Optuna refuses it."""
    from optuna.exceptions import UpdateFinishedTrialError

    store = create_storage(url, heartbeat_interval=None)
    assert isinstance(store, ResilientRDBStorage)
    study = optuna.create_study(storage=store, study_name="batched")
    ours, theirs = study.ask(), study.ask()
    user = {f"u{i}": (i * 1.5 if i % 2 else {"list": [i, "x"]}) for i in range(18)}
    system = {"search:config": {"lr": 1e-4, "model": "m"}, "s": None}
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *rest: object) -> None:
        statements.append(statement)

    sqlalchemy.event.listen(store.engine, "before_cursor_execute", count)
    try:
        store.set_trial_attrs(ours._trial_id, user, system)
    finally:
        sqlalchemy.event.remove(store.engine, "before_cursor_execute", count)
    writes = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    assert len(writes) == 2, statements  # one per table, not one per attribute
    assert len(statements) <= 6, statements  # the trial's read, the writes, the transaction
    for key, value in user.items():
        store.set_trial_user_attr(theirs._trial_id, key, value)
    for key, value in system.items():
        store.set_trial_system_attr(theirs._trial_id, key, value)
    got, want = store.get_trial(ours._trial_id), store.get_trial(theirs._trial_id)
    assert got.user_attrs == want.user_attrs == user
    mine = {k: got.system_attrs[k] for k in system}  # beside the trial's own (client_token)
    assert mine == {k: want.system_attrs[k] for k in system} == system

    store.set_trial_attrs(ours._trial_id, {"u1": "again", "new": 1}, {})  # an upsert
    assert store.get_trial(ours._trial_id).user_attrs == {**user, "u1": "again", "new": 1}
    study.tell(ours, 0.5)
    with pytest.raises(UpdateFinishedTrialError):
        store.set_trial_attrs(ours._trial_id, {"late": 1}, {})
    assert "late" not in store.get_trial(ours._trial_id).user_attrs


def test_trial_attrs_in_one_transaction_on_sqlite(tmp_path: Path) -> None:
    _attrs_in_one_transaction(f"sqlite:///{tmp_path / 'b.db'}")


def test_trial_attrs_in_one_transaction_on_postgres(pg_db: str) -> None:
    _attrs_in_one_transaction(pg_db)
