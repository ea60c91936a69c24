"""Each private Optuna / optuna-dashboard name ``storage.compat`` relies on, on a real study.

One test per name. A release that renames or changes one fails here, loudly and by name,
before anything else in the suite: update ``storage/compat.py`` (the only module that touches
them) and the pins in ``pyproject.toml``.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from storage import ResilientRDBStorage
from storage import compat

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed"),
]


@pytest.fixture
def rdb(tmp_path: Path) -> Iterator[RDBStorage]:
    storage = RDBStorage(
        f"sqlite:///{tmp_path / 'compat.db'}",
        heartbeat_interval=60,
        grace_period=60,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
    )
    yield storage
    storage.engine.dispose()


@pytest.fixture
def study(rdb: RDBStorage) -> optuna.Study:
    return optuna.create_study(study_name="compat", storage=rdb)


def _trial_template(**system: object) -> FrozenTrial:
    return optuna.trial.create_trial(
        state=TrialState.WAITING,
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs={"u": 1},
        system_attrs=dict(system),
    )


# ------------------------------------------------------------------ Study and Trial


def test_study_storage_is_study_private_storage(study: optuna.Study, rdb: RDBStorage) -> None:
    storage = compat.study_storage(study)  # Study._storage
    assert compat.rdb_backend(storage) is rdb
    assert storage.get_study_id_from_name("compat") == compat.study_id(study)


def test_study_id_is_study_private_study_id(study: optuna.Study, rdb: RDBStorage) -> None:
    assert compat.study_id(study) == rdb.get_study_id_from_name("compat")  # Study._study_id


def test_trial_id_is_the_private_trial_id_of_trial_and_frozen_trial(
    study: optuna.Study, rdb: RDBStorage
) -> None:
    trial = study.ask()  # Trial._trial_id, FrozenTrial._trial_id
    expected = rdb.get_trial_id_from_study_id_trial_number(compat.study_id(study), 0)
    assert compat.trial_id(trial) == expected
    assert compat.trial_id(study.trials[0]) == expected


def test_forget_cached_trials_clears_the_per_thread_trial_cache(
    study: optuna.Study, rdb: RDBStorage
) -> None:
    # Study._thread_local.cached_all_trials: what Study._get_trials(use_cache=True) reads.
    assert study._get_trials(deepcopy=False, use_cache=True) == []
    rdb.create_new_trial(compat.study_id(study))  # behind the study's back
    assert study._get_trials(deepcopy=False, use_cache=True) == []  # still cached
    compat.forget_cached_trials(study)
    assert len(study._get_trials(deepcopy=False, use_cache=True)) == 1


def test_pinned_study_answers_the_samplers_private_trial_reads(study: optuna.Study) -> None:
    # Study._get_trials(deepcopy, states, use_cache): what Optuna's samplers read the list by.
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    trial = study.trials[-1]

    def space(of: optuna.Study) -> dict[str, object]:
        sampler = optuna.samplers.TPESampler(multivariate=True, n_startup_trials=1)
        return dict(sampler.infer_relative_search_space(of, trial))

    assert set(space(study)) == {"x"}
    assert space(compat.pinned_study(study, [])) == {}  # the sampler read the pinned list
    assert set(space(compat.pinned_study(study, study.get_trials()))) == {"x"}
    pinned = compat.pinned_study(study, study.get_trials()[:1])
    assert len(pinned.get_trials()) == 1 and pinned.study_name == study.study_name


def test_enqueue_trial_returns_the_id_and_fixes_the_params(
    study: optuna.Study, rdb: RDBStorage
) -> None:
    # Optuna's system attribute ``fixed_params`` (what Study.enqueue_trial writes).
    tid = compat.enqueue_trial(study, {"x": 0.25}, {"stage": "s"})
    assert rdb.get_trial(tid).state == TrialState.WAITING
    trial = study.ask()
    assert compat.trial_id(trial) == tid
    assert trial.suggest_float("x", 0, 1) == 0.25 and trial.user_attrs == {"stage": "s"}


# ------------------------------------------------------------------ storages


def test_rdb_backend_unwraps_the_cached_storage(rdb: RDBStorage) -> None:
    cached = optuna.storages.get_storage(rdb)  # _CachedStorage and its _backend
    assert type(cached).__name__ == "_CachedStorage"
    assert compat.rdb_backend(cached) is rdb
    assert compat.rdb_backend(rdb) is rdb
    assert compat.rdb_backend(optuna.storages.InMemoryStorage()) is None


def test_heartbeat_base_and_enabled_check(rdb: RDBStorage) -> None:
    # optuna.storages._heartbeat.BaseHeartbeat and is_heartbeat_enabled
    assert isinstance(rdb, compat.BaseHeartbeat)
    assert compat.is_heartbeat_enabled(rdb)
    assert not compat.is_heartbeat_enabled(optuna.storages.InMemoryStorage())
    assert "_get_stale_trial_ids" in compat.BaseHeartbeat.__abstractmethods__


def test_stale_trial_ids_is_the_private_stale_query(study: optuna.Study, rdb: RDBStorage) -> None:
    trial = study.ask()  # BaseHeartbeat._get_stale_trial_ids
    tid = compat.trial_id(trial)
    rdb.record_heartbeat(tid)
    assert compat.stale_trial_ids(rdb, compat.study_id(study)) == []
    beats = compat.tables.TrialHeartbeatModel.__table__
    with rdb.engine.begin() as conn:
        conn.execute(
            sqlalchemy.update(beats)
            .where(beats.c.trial_id == tid)
            .values(heartbeat=datetime.now() - timedelta(hours=2))
        )
    assert compat.stale_trial_ids(rdb, compat.study_id(study)) == [tid]


def test_stale_retry_limit_reads_the_callbacks_private_max_retry(rdb: RDBStorage) -> None:
    assert compat.stale_retry_limit(rdb) == 3  # RetryHeartbeatStaleTrialCallback._max_retry
    assert compat.stale_retry_limit(optuna.storages.InMemoryStorage()) is None


def test_scoped_session_commits_and_rolls_back(study: optuna.Study, rdb: RDBStorage) -> None:
    trials = compat.tables.TrialModel  # optuna.storages._rdb.storage._create_scoped_session
    sid = compat.study_id(study)
    with compat.scoped_session(rdb) as session:
        compat.add_trial_in(rdb, session, sid, None)
    assert rdb.get_n_trials(sid) == 1
    with pytest.raises(RuntimeError), compat.scoped_session(rdb) as session:
        compat.add_trial_in(rdb, session, sid, None)
        raise RuntimeError("rolled back")
    assert rdb.get_n_trials(sid) == 1
    with compat.scoped_session(rdb) as session:
        assert session.query(trials).count() == 1


def test_set_trial_attr_in_upserts_inside_the_transaction(
    study: optuna.Study, rdb: RDBStorage
) -> None:
    tid = compat.trial_id(study.ask())  # RDBStorage._set_trial_attr_without_commit
    with compat.scoped_session(rdb) as session:
        compat.set_trial_attr_in(rdb, session, tid, "a", 1)
        compat.set_trial_attr_in(rdb, session, tid, "a", {"b": [2]})
        compat.set_trial_attr_in(rdb, session, tid, "s", "x", system=True)
    frozen = rdb.get_trial(tid)
    assert frozen.user_attrs == {"a": {"b": [2]}} and frozen.system_attrs == {"s": "x"}
    rdb.set_trial_state_values(tid, TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError), compat.scoped_session(rdb) as session:
        compat.set_trial_attr_in(rdb, session, tid, "a", 3)


def test_add_trial_in_inserts_a_numbered_trial_from_a_template(
    study: optuna.Study, rdb: RDBStorage
) -> None:
    sid = compat.study_id(study)  # RDBStorage._get_prepared_new_trial
    study.ask()
    with compat.scoped_session(rdb) as session:
        compat.tables.StudyModel.find_or_raise_by_id(sid, session, for_update=True)
        row = compat.add_trial_in(rdb, session, sid, _trial_template(k="v"))
        assert row.number == 1 and row.trial_id > 0
    frozen = rdb.get_all_trials(sid)[1]
    assert frozen.state == TrialState.WAITING and frozen.params == {"x": 0.5}
    assert frozen.user_attrs == {"u": 1} and frozen.system_attrs == {"k": "v"}


def test_set_trial_value_in_sets_an_objective_value(study: optuna.Study, rdb: RDBStorage) -> None:
    tid = compat.trial_id(study.ask())  # RDBStorage._set_trial_value_without_commit
    with compat.scoped_session(rdb) as session:
        row = compat.tables.TrialModel.find_or_raise_by_id(tid, session, for_update=True)
        compat.set_trial_value_in(rdb, session, row, 0, 0.25)
        row.state = TrialState.COMPLETE
    assert rdb.get_trial(tid).values == [0.25]


def test_orm_read_trials_is_optunas_own_read(study: optuna.Study, rdb: RDBStorage) -> None:
    sid = compat.study_id(study)  # RDBStorage._get_trials
    study.tell(study.ask(), 1.0)
    study.enqueue_trial({"x": 0.5})
    trials = compat.orm_read_trials(rdb, sid, None, set(), -1)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.WAITING]
    assert trials == rdb.get_all_trials(sid)


def test_the_cache_calls_the_private_backend_methods_storage_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _CachedStorage calls these on its backend; storage._rdb retries or overrides them.
    source = inspect.getsource(optuna.storages._CachedStorage)
    for name in compat.CACHED_BACKEND_METHODS:
        assert callable(getattr(RDBStorage, name)), name
        assert f"self._backend.{name}(" in source, name
    rdb = ResilientRDBStorage(f"sqlite:///{tmp_path / 'hook.db'}")
    calls: list[str] = []
    fast = ResilientRDBStorage._get_trials

    def spy(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        calls.append("_get_trials")
        return fast(self, *args, **kwargs)

    monkeypatch.setattr(ResilientRDBStorage, "_get_trials", spy)
    study = optuna.create_study(storage=rdb)
    study.ask()
    assert len(study.trials) == 1 and calls  # the fast read is the one the cache used
    rdb.engine.dispose()


def test_tables_have_the_columns_storage_reads(rdb: RDBStorage) -> None:
    t = compat.tables  # optuna.storages._rdb.models
    columns: dict[Any, set[str]] = {
        t.TrialModel: {"trial_id", "number", "study_id", "state", "datetime_start"},
        t.TrialSystemAttributeModel: {"trial_id", "key", "value_json"},
        t.TrialUserAttributeModel: {"trial_id", "key", "value_json"},
        t.StudySystemAttributeModel: {"study_id", "key", "value_json"},
        t.TrialParamModel: {"trial_id", "param_name", "param_value", "distribution_json"},
        t.TrialValueModel: {"trial_id", "objective", "value", "value_type"},
        t.TrialIntermediateValueModel: {"trial_id", "step", "intermediate_value"},
        t.TrialHeartbeatModel: {"trial_id", "heartbeat"},
        t.StudyDirectionModel: {"study_id", "objective", "direction"},
    }
    for model, names in columns.items():
        assert names <= set(model.__table__.c.keys()), model.__name__
    assert isinstance(t.NOT_FOUND_MSG, str)


def test_default_study_name_has_optunas_prefix() -> None:
    # optuna.storages._base.DEFAULT_STUDY_NAME_PREFIX
    auto = optuna.create_study().study_name
    name = compat.default_study_name()
    assert name.startswith("no-name-") and auto.startswith("no-name-") and name != auto


def test_artifact_store_protocol_is_importable_and_met(tmp_path: Path) -> None:
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path))
    for method in ("open_reader", "write", "remove"):  # optuna.artifacts._protocol
        assert callable(getattr(compat.ArtifactStore, method))
        assert callable(getattr(store, method))


# ------------------------------------------------------------------ gRPC proxy


def test_trial_round_trips_through_optunas_grpc_message() -> None:
    trial = optuna.trial.create_trial(  # servicer._to_proto_trial / _from_proto_trial
        state=TrialState.COMPLETE,
        value=0.5,
        params={"x": 0.25},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs={"u": [1, 2]},
        system_attrs={"retry_history": [3]},
        intermediate_values={1: 0.1},
    )
    back = compat.trial_from_bytes(compat.trial_to_bytes(trial))
    assert (back.state, back.values, back.params) == (trial.state, [0.5], {"x": 0.25})
    assert back.user_attrs == {"u": [1, 2]} and back.system_attrs == {"retry_history": [3]}
    assert back.intermediate_values == {1: 0.1}


def test_optunas_storage_service_serves_a_grpc_client(rdb: RDBStorage) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    # servicer.OptunaStorageProxyService, api_pb2_grpc, GrpcStorageProxy._channel
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    compat.add_storage_service(server, optuna.storages.get_storage(rdb))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port)
        client.wait_server_ready(timeout=20)
        assert isinstance(compat.proxy_channel(client), grpc.Channel)
        study = optuna.create_study(study_name="via-grpc", storage=client)
        study.tell(study.ask(), 2.0)
        assert rdb.get_all_trials(compat.study_id(study))[0].values == [2.0]
        client.close()
    finally:
        server.stop(None)


# ------------------------------------------------------------------ optuna-dashboard


def test_dashboard_note_keys_are_optuna_dashboards(study: optuna.Study) -> None:
    note = pytest.importorskip("optuna_dashboard._note")
    # note_ver_key, note_str_key_prefix, SYSTEM_ATTR_MAX_LENGTH
    assert compat.DASHBOARD_NOTE_CHUNK == note.SYSTEM_ATTR_MAX_LENGTH
    tid = compat.trial_id(study.ask())
    keys = compat.dashboard_note_keys(tid)
    assert keys is not None
    version_key, chunk_key = keys
    storage = compat.study_storage(study)
    storage.set_study_system_attr(compat.study_id(study), chunk_key, "a note")
    storage.set_study_system_attr(compat.study_id(study), version_key, 1)
    system = storage.get_study_system_attrs(compat.study_id(study))
    assert note.get_note_from_system_attrs(system, tid) == {"version": 1, "body": "a note"}


def test_save_dashboard_trial_note_writes_a_finished_trials_note(study: optuna.Study) -> None:
    note = pytest.importorskip("optuna_dashboard._note")
    trial = study.ask()  # save_note reads the stand-in's storage, study and _trial_id
    study.tell(trial, 1.0)
    tid = compat.trial_id(trial)
    compat.save_dashboard_trial_note(study, tid, "first")
    compat.save_dashboard_trial_note(study, tid, "second " * 400)  # two chunks, version 2
    system = compat.study_storage(study).get_study_system_attrs(compat.study_id(study))
    got = note.get_note_from_system_attrs(system, tid)
    assert got["version"] == 2 and got["body"] == "second " * 400
    assert json.dumps(got)  # plain data


def test_notes_are_written_without_importing_the_dashboards_app(tmp_path: Path) -> None:
    """A worker writes its notes through optuna-dashboard's notes module alone: the package
    (its web app, scikit-learn through optuna.importance: seconds of CPU per worker) is not
    imported, and the dashboard reads the notes back."""
    note = pytest.importorskip("optuna_dashboard._note")
    url = f"sqlite:///{tmp_path / 'notes.db'}"
    code = f"""
import sys, optuna
from storage import compat
study = optuna.create_study(study_name="s", storage={url!r})
trial = study.ask()
study.tell(trial, 1.0)
tid = compat.trial_id(trial)
assert compat.dashboard_installed()
compat.save_dashboard_trial_note(study, tid, "trial note")
compat.save_dashboard_study_note(study, "study note")
print(sorted(m for m in ("optuna_dashboard", "sklearn") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    study = optuna.load_study(study_name="s", storage=url)
    system = compat.study_storage(study).get_study_system_attrs(compat.study_id(study))
    trial_id = compat.trial_id(study.trials[0])
    assert note.get_note_from_system_attrs(system, trial_id)["body"] == "trial note"
    assert note.get_note_from_system_attrs(system, None)["body"] == "study note"
