"""Every use of Optuna's and optuna-dashboard's private names, behind typed public functions.

Names with a leading underscore carry no compatibility promise: a minor release may rename
or change them. Nothing else in this project touches them; each function here names the
private name it relies on. Tested on optuna 5.1.0 and optuna-dashboard 0.21.0
(``tests/test_optuna_compat.py``: one test per name, on a real study, failing loudly when a
release renames or changes one); ``pyproject.toml`` pins the range those tests ran on.

Besides the functions, three private hooks are *overridden* (their names are Optuna's):
``RDBStorage._get_trials`` (``storage._rdb``: the fast trial read, which Optuna's cache calls
on its backend), ``BaseHeartbeat._get_stale_trial_ids`` (``storage._proxy_client``) and
``Study._get_trials`` (:func:`pinned_study`: what the samplers read the trial list by);
:data:`CACHED_BACKEND_METHODS` lists the private methods the cache calls on its backend.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import sqlite3
import sys
import uuid
from collections.abc import Container
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

import optuna
import sqlalchemy.orm
from optuna.artifacts._protocol import ArtifactStore
from optuna.storages import BaseStorage
from optuna.storages import GrpcStorageProxy
from optuna.storages import RDBStorage
from optuna.storages import _CachedStorage
from optuna.storages._base import DEFAULT_STUDY_NAME_PREFIX
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages._rdb import models as tables
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

if TYPE_CHECKING:
    import grpc

__all__ = [
    "ArtifactStore",
    "BaseHeartbeat",
    "CACHED_BACKEND_METHODS",
    "DASHBOARD_NOTE_CHUNK",
    "TESTED",
    "add_storage_service",
    "add_trial_in",
    "dashboard_installed",
    "dashboard_note_keys",
    "default_study_name",
    "enqueue_trial",
    "forget_cached_trials",
    "is_heartbeat_enabled",
    "orm_read_trials",
    "pinned_study",
    "proxy_channel",
    "rdb_backend",
    "save_dashboard_study_note",
    "save_dashboard_trial_note",
    "scoped_session",
    "set_trial_attr_in",
    "set_trial_attrs_in",
    "set_trial_value_in",
    "stale_retry_limit",
    "stale_trial_ids",
    "study_id",
    "study_name_limit",
    "study_storage",
    "tables",
    "trial_from_bytes",
    "trial_id",
    "trial_to_bytes",
    "use_proxy_channel",
]

# The versions the tests ran on (pyproject pins optuna>=5.1,<5.2, optuna-dashboard>=0.21,<0.22).
TESTED = {"optuna": "5.1.0", "optuna-dashboard": "0.21.0"}

# ``tables`` is ``optuna.storages._rdb.models``: the SQLAlchemy models of Optuna's schema
# (TrialModel, TrialSystemAttributeModel, ...). ``ArtifactStore`` is
# ``optuna.artifacts._protocol.ArtifactStore`` (typing only). ``BaseHeartbeat`` and
# ``is_heartbeat_enabled`` are ``optuna.storages._heartbeat``'s.

# Private methods of ``RDBStorage`` that Optuna's ``_CachedStorage`` calls on its backend
# (``storage._rdb`` retries or overrides them).
CACHED_BACKEND_METHODS = (
    "_create_new_trial",
    "_set_trial_param",
    "_get_trials",
    "_get_best_trial_id",
    "_get_stale_trial_ids",
)

# optuna-dashboard's longest note chunk (``optuna_dashboard._note.SYSTEM_ATTR_MAX_LENGTH``).
DASHBOARD_NOTE_CHUNK = 2045


# ------------------------------------------------------------------ Study and Trial


def study_storage(study: optuna.Study) -> BaseStorage:
    """The study's storage, as Optuna wraps it (``Study._storage``)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The study's database id (``Study._study_id``)."""
    return study._study_id


def trial_id(trial: optuna.trial.Trial | FrozenTrial) -> int:
    """The trial's database id, not its number (``Trial._trial_id``, ``FrozenTrial._trial_id``)."""
    return trial._trial_id


def forget_cached_trials(study: optuna.Study) -> None:
    """Make the study read its trials again (``Study._thread_local.cached_all_trials``).

    Optuna caches the trial list per thread inside ``ask``/``tell``; a trial taken or failed
    behind its back (a re-queued trial set RUNNING directly) must clear it.
    """
    study._thread_local.cached_all_trials = None


class _PinnedStudy:
    """``study`` with its trial list reads answered from ``trials`` (see ``pinned_study``)."""

    def __init__(self, study: optuna.Study, trials: Sequence[FrozenTrial]) -> None:
        self._pinned_study = study
        self._pinned_trials = list(trials)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pinned_study, name)

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        trials = [t for t in self._pinned_trials if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)


def pinned_study(study: optuna.Study, trials: Sequence[FrozenTrial]) -> optuna.Study:
    """``study``, its reads of the trial list answered from ``trials`` (a list just read).

    Optuna's samplers read the list through the private ``Study._get_trials`` (TPE: its
    search space and startup count from the per-thread cache, its constant liar uncached,
    once per ``_sample``); everything else (the storage, the directions, writes) is the
    study's own. The worker's trial step hands its sampler the snapshot read under the budget
    lock (issue 15: one read of the trial list per step).
    """
    return cast(optuna.Study, _PinnedStudy(study, trials))


def enqueue_trial(
    study: optuna.Study, params: dict[str, Any], user_attrs: dict[str, Any] | None = None
) -> int:
    """``Study.enqueue_trial``, returning the new WAITING trial's id (Optuna's returns None).

    Optuna's system attribute ``fixed_params`` holds the values ``Trial`` suggests first (what
    ``enqueue_trial`` writes); ``BaseStorage.create_new_trial`` returns the id, so the caller
    can take the trial without reading the trial list again.
    """
    template = optuna.trial.create_trial(
        state=TrialState.WAITING, system_attrs={"fixed_params": params}, user_attrs=user_attrs
    )
    return study._storage.create_new_trial(study._study_id, template_trial=template)


# ------------------------------------------------------------------ storages


def rdb_backend(storage: BaseStorage) -> RDBStorage | None:
    """The ``RDBStorage`` behind ``storage``, unwrapping Optuna's cache, if there is one.

    Relies on ``optuna.storages._CachedStorage`` and its ``_backend``.
    """
    if isinstance(storage, _CachedStorage):
        storage = storage._backend
    return storage if isinstance(storage, RDBStorage) else None


def stale_trial_ids(storage: BaseHeartbeat, study_id: int) -> list[int]:
    """RUNNING trials whose heartbeat is older than the grace period.

    ``BaseHeartbeat._get_stale_trial_ids`` (the storage's own grace period and clock).
    """
    return storage._get_stale_trial_ids(study_id)


def stale_retry_limit(storage: BaseStorage) -> int | None:
    """``max_retry`` of the storage's ``RetryHeartbeatStaleTrialCallback``, if it has one.

    ``RetryHeartbeatStaleTrialCallback._max_retry`` (no public accessor).
    """
    if not isinstance(storage, BaseHeartbeat):
        return None
    callback = storage.get_heartbeat_stale_trial_callback()
    return getattr(callback, "_max_retry", None)


def study_name_limit() -> int:
    """The longest study name the schema holds: the length of ``studies.study_name``
    (``tables.StudyModel``; VARCHAR(512) in Optuna 5). SQLite would store a longer one, a
    server database refuses it: checked up front for both."""
    return int(tables.StudyModel.__table__.c.study_name.type.length)


def default_study_name() -> str:
    """A fresh name like the ones Optuna gives unnamed studies (``no-name-<uuid>``).

    ``optuna.storages._base.DEFAULT_STUDY_NAME_PREFIX``.
    """
    return f"{DEFAULT_STUDY_NAME_PREFIX}{uuid.uuid4()}"


@contextmanager
def scoped_session(
    rdb: RDBStorage, *, ignore_integrity_error: bool = False
) -> Iterator[sqlalchemy.orm.Session]:
    """One transaction on the storage's thread session, committed at the end of the block.

    ``optuna.storages._rdb.storage._create_scoped_session``: database errors are raised as
    ``StorageInternalError`` (from the SQLAlchemy error), an ``IntegrityError`` as itself
    unless ignored. Do not nest: the inner block would close the outer session.
    """
    with _create_scoped_session(rdb.scoped_session, ignore_integrity_error) as session:
        yield session


def set_trial_attr_in(
    rdb: RDBStorage,
    session: sqlalchemy.orm.Session,
    trial_id: int,
    key: str,
    value: Any,
    *,
    system: bool = False,
) -> None:
    """Upsert a trial's user (or system) attribute inside ``session``'s transaction.

    ``RDBStorage._set_trial_attr_without_commit`` (raises ``UpdateFinishedTrialError`` for a
    finished trial).
    """
    model = tables.TrialSystemAttributeModel if system else tables.TrialUserAttributeModel
    rdb._set_trial_attr_without_commit(session, model, trial_id, key, value)


def set_trial_attrs_in(
    rdb: RDBStorage,
    session: sqlalchemy.orm.Session,
    trial_id: int,
    user: Mapping[str, Any],
    system: Mapping[str, Any],
) -> None:
    """Upsert many of a trial's attributes inside ``session``'s transaction.

    What ``set_trial_attr_in`` does for one, for all at once: the trial is read and checked
    once (``UpdateFinishedTrialError`` for a finished one), then one ``INSERT ... ON CONFLICT
    DO UPDATE`` per table on SQLite and PostgreSQL (Optuna's own upsert, many rows), instead of
    a read and an upsert per attribute: a trial's claimed record (~18 attributes) is two
    round trips to a PostgreSQL server, not ~36. Other databases take the attributes one by one.
    """
    if not user and not system:
        return
    batched = rdb.engine.name == "postgresql" or (
        rdb.engine.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0)
    )
    if not batched:
        for is_system, values in ((False, user), (True, system)):
            for key, value in values.items():
                set_trial_attr_in(rdb, session, trial_id, key, value, system=is_system)
        return
    trial = tables.TrialModel.find_or_raise_by_id(trial_id, session)
    rdb.check_trial_is_updatable(trial_id, trial.state)
    if rdb.engine.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    for model, values in (
        (tables.TrialUserAttributeModel, user),
        (tables.TrialSystemAttributeModel, system),
    ):
        if not values:
            continue
        rows = [
            {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
            for k, v in values.items()
        ]
        statement = insert(model).values(rows)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[model.trial_id, model.key],
                set_={"value_json": statement.excluded.value_json},
            )
        )


def add_trial_in(
    rdb: RDBStorage, session: sqlalchemy.orm.Session, study_id: int, template: FrozenTrial | None
) -> tables.TrialModel:
    """Insert a trial (numbered, flushed) from ``template`` inside ``session``'s transaction.

    ``RDBStorage._get_prepared_new_trial``: the caller holds the study row ``FOR UPDATE``
    (trial numbers are counted). ``None``: a fresh RUNNING trial started now.
    """
    return rdb._get_prepared_new_trial(study_id, template, session)


def set_trial_value_in(
    rdb: RDBStorage,
    session: sqlalchemy.orm.Session,
    trial: tables.TrialModel,
    objective: int,
    value: float,
) -> None:
    """Set one objective value of a trial inside ``session``'s transaction.

    ``RDBStorage._set_trial_value_without_commit``.
    """
    rdb._set_trial_value_without_commit(session, trial, objective, value)


def orm_read_trials(
    rdb: RDBStorage,
    study_id: int,
    states: Container[TrialState] | None,
    included_trial_ids: set[int],
    trial_id_greater_than: int,
) -> list[FrozenTrial]:
    """Optuna's own ORM read of a study's trials, bypassing any override.

    ``RDBStorage._get_trials`` (what ``_CachedStorage`` reads new and unfinished trials with).
    """
    return RDBStorage._get_trials(rdb, study_id, states, included_trial_ids, trial_id_greater_than)


# ------------------------------------------------------------------ gRPC proxy


def trial_to_bytes(trial: FrozenTrial) -> bytes:
    """A trial as Optuna's gRPC message (``optuna.storages._grpc.servicer._to_proto_trial``)."""
    from optuna.storages._grpc import servicer

    return servicer._to_proto_trial(trial).SerializeToString()  # type: ignore[no-any-return]


def trial_from_bytes(data: bytes) -> FrozenTrial:
    """The trial written by :func:`trial_to_bytes` (``servicer._from_proto_trial``,
    ``optuna.storages._grpc.auto_generated.api_pb2.Trial``)."""
    from optuna.storages._grpc import servicer
    from optuna.storages._grpc.auto_generated import api_pb2

    return servicer._from_proto_trial(api_pb2.Trial.FromString(data))


def add_storage_service(server: grpc.Server, storage: BaseStorage) -> None:
    """Serve Optuna's gRPC storage API for ``storage`` on ``server``.

    ``optuna.storages._grpc.servicer.OptunaStorageProxyService`` and
    ``optuna.storages._grpc.auto_generated.api_pb2_grpc`` (``run_grpc_proxy_server`` builds
    and blocks on a server of its own; this adds the service to ours).
    """
    from optuna.storages._grpc import servicer
    from optuna.storages._grpc.auto_generated import api_pb2_grpc

    service = servicer.OptunaStorageProxyService(storage)
    api_pb2_grpc.add_StorageServiceServicer_to_server(service, server)


def proxy_channel(proxy: GrpcStorageProxy) -> grpc.Channel:
    """The gRPC channel of Optuna's proxy client (``GrpcStorageProxy._channel``)."""
    return proxy._channel


def use_proxy_channel(proxy: GrpcStorageProxy, channel: grpc.Channel) -> None:
    """Make Optuna's proxy client call through ``channel`` (TLS, a token), closing its own.

    What ``GrpcStorageProxy._setup`` builds on its insecure channel: ``_channel``, ``_stub``
    (``api_pb2_grpc.StorageServiceStub``) and ``_cache`` (``client.GrpcClientCache``).
    """
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.client import GrpcClientCache

    proxy._channel.close()
    proxy._channel = channel
    proxy._stub = api_pb2_grpc.StorageServiceStub(channel)
    proxy._cache = GrpcClientCache(proxy._stub)


# ------------------------------------------------------------------ optuna-dashboard


def dashboard_installed() -> bool:
    """Whether optuna-dashboard is installed (found, not imported)."""
    return importlib.util.find_spec("optuna_dashboard") is not None


@functools.cache
def _dashboard_note() -> ModuleType | None:
    """optuna-dashboard's notes module (``optuna_dashboard._note``), or None if not installed.

    Its notes need only that module (it imports optuna alone), but importing it through the
    package runs the package's ``__init__``: the web app, and scikit-learn through
    ``optuna.importance`` (2-4 s of CPU in every worker, BENCHMARKS.md "Issue 17"). So unless
    the package is already imported, the module is loaded from its file on its own.
    """
    if "optuna_dashboard" in sys.modules:
        import optuna_dashboard._note as note

        return note
    package = importlib.util.find_spec("optuna_dashboard")
    if package is None or not package.submodule_search_locations:
        return None
    path = Path(next(iter(package.submodule_search_locations))) / "_note.py"
    spec = importlib.util.spec_from_file_location("optuna_dashboard._note", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require_dashboard_note() -> ModuleType:
    note = _dashboard_note()
    if note is None:
        raise ImportError("optuna-dashboard is not installed")
    return note


def dashboard_note_keys(trial_id: int) -> tuple[str, str] | None:
    """optuna-dashboard's study system attribute keys of a trial note's version and first chunk.

    ``optuna_dashboard._note.note_ver_key`` and ``note_str_key_prefix``; ``None`` when the
    installed optuna-dashboard has neither (or is not installed).
    """
    note = _dashboard_note()
    if note is None or not all(hasattr(note, k) for k in ("note_ver_key", "note_str_key_prefix")):
        return None
    return note.note_ver_key(trial_id), f"{note.note_str_key_prefix(trial_id)}0"


def save_dashboard_study_note(study: optuna.Study, text: str) -> None:
    """``optuna_dashboard.save_note`` of the study (without importing the dashboard's app)."""
    _require_dashboard_note().save_note(study, text)


class _TrialRef:
    """What ``optuna_dashboard.save_note`` reads of a trial: ``storage``, ``study``,
    ``_trial_id`` (a finished trial cannot be wrapped in an ``optuna.Trial``)."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.storage = study_storage(study)
        self.study = study
        self._trial_id = trial_id


def save_dashboard_trial_note(study: optuna.Study, trial_id: int, text: str) -> None:
    """``optuna_dashboard.save_note`` for a trial given by id (finished trials too).

    ``save_note`` takes an ``optuna.Trial`` and reads its private ``_trial_id``; it gets a
    stand-in with that attribute.
    """
    _require_dashboard_note().save_note(_TrialRef(study, trial_id), text)
