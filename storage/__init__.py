"""Persistence: a storage URL -> an Optuna storage, heartbeats, named locks, health checks.

PostgreSQL for teams (many workers, one study), an SQLite file as the embedded default. The
study and trial internals other packages need (a study's storage and id, a trial's id, the
stale-trial query, dashboard note keys) are :mod:`storage.compat`'s, re-exported here: nothing
outside it touches Optuna's or optuna-dashboard's private names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage._check import StorageStatus
from storage._check import check_storage
from storage._classify import classify
from storage._create import check_heartbeat_env
from storage._create import check_new_sqlite
from storage._create import create_storage
from storage._engine import ENV_CONNECT_TIMEOUT
from storage._engine import connect_timeout
from storage._error import StorageError
from storage._error import StorageUnreachable
from storage._fast_read import read_summary_trials
from storage._fast_read import read_user_attr
from storage._fence import LockLost
from storage._fence import fence_writes
from storage._heartbeat import HeartbeatThread
from storage._heartbeat import adopt_orphans
from storage._heartbeat import heartbeat
from storage._lock import lock_timeout
from storage._lock import named_lock
from storage._ops import fail_and_enqueue
from storage._proxy_security import ProxySecurityError
from storage._proxy_security import ServerSecurity
from storage._proxy_security import server_security
from storage._rdb import CLIENT_TOKEN
from storage._rdb import STATE_TOKEN
from storage._rdb import ResilientRDBStorage
from storage._retry import call_with_retry
from storage._retry import is_transient
from storage._secrets import check_password
from storage._secrets import is_loopback
from storage._url import ENV_STORAGE
from storage._url import ENV_STORAGE_FILE
from storage._url import default_storage_url
from storage._url import is_proxy_url
from storage._url import redact_url
from storage._url import resolve_storage_url
from storage._url import scrub
from storage._url import sqlite_file
from storage._url import storage_url_source
from storage.compat import DASHBOARD_NOTE_CHUNK
from storage.compat import ArtifactStore
from storage.compat import BaseHeartbeat
from storage.compat import dashboard_installed
from storage.compat import dashboard_note_keys
from storage.compat import forget_cached_trials
from storage.compat import is_heartbeat_enabled
from storage.compat import rdb_backend
from storage.compat import save_dashboard_study_note
from storage.compat import save_dashboard_trial_note
from storage.compat import stale_retry_limit
from storage.compat import stale_trial_ids
from storage.compat import study_id
from storage.compat import study_name_limit
from storage.compat import study_storage
from storage.compat import trial_id

if TYPE_CHECKING:
    import grpc
    from optuna.storages import RDBStorage

__all__ = [
    "CLIENT_TOKEN",
    "DASHBOARD_NOTE_CHUNK",
    "ENV_CONNECT_TIMEOUT",
    "ENV_STORAGE",
    "ENV_STORAGE_FILE",
    "STATE_TOKEN",
    "ArtifactStore",
    "BaseHeartbeat",
    "HeartbeatThread",
    "ProxySecurityError",
    "LockLost",
    "ResilientRDBStorage",
    "ServerSecurity",
    "StorageError",
    "StorageStatus",
    "StorageUnreachable",
    "adopt_orphans",
    "call_with_retry",
    "check_heartbeat_env",
    "check_new_sqlite",
    "check_password",
    "check_storage",
    "classify",
    "connect_timeout",
    "create_storage",
    "dashboard_installed",
    "dashboard_note_keys",
    "default_storage_url",
    "fail_and_enqueue",
    "fence_writes",
    "forget_cached_trials",
    "heartbeat",
    "is_heartbeat_enabled",
    "is_loopback",
    "is_proxy_url",
    "is_transient",
    "lock_timeout",
    "make_proxy_server",
    "named_lock",
    "rdb_backend",
    "read_summary_trials",
    "read_user_attr",
    "redact_url",
    "resolve_storage_url",
    "save_dashboard_study_note",
    "save_dashboard_trial_note",
    "scrub",
    "server_security",
    "sqlite_file",
    "stale_retry_limit",
    "stale_trial_ids",
    "storage_url_source",
    "study_id",
    "study_name_limit",
    "study_storage",
    "trial_id",
]


def make_proxy_server(
    rdb: RDBStorage,
    host: str,
    port: int,
    *,
    threads: int = 256,
    url: str = "",
    security: ServerSecurity | None = None,
) -> grpc.Server:
    """``search proxy``'s gRPC server, not started (``storage._proxy_server``; imports grpc).

    Optuna's storage service plus ``search.Extras`` (the budget's operations, the named lock,
    the writes with a client token) on ``rdb``; TLS and a token check with ``security``.

    Raises:
        RuntimeError: The address cannot be bound.
    """
    from storage._proxy_server import make_proxy_server as make

    return make(rdb, host, port, threads=threads, url=url, security=security)
