"""Persistence: a storage URL -> an Optuna storage, heartbeats, named locks, health checks.

PostgreSQL for teams (many workers, one study), an SQLite file as the embedded default.
"""

from storage._check import StorageStatus
from storage._check import check_storage
from storage._classify import classify
from storage._create import create_storage
from storage._engine import ENV_CONNECT_TIMEOUT
from storage._engine import connect_timeout
from storage._error import StorageError
from storage._error import StorageUnreachable
from storage._fast_read import read_summary_trials
from storage._fast_read import read_user_attr
from storage._heartbeat import HeartbeatThread
from storage._heartbeat import adopt_orphans
from storage._heartbeat import heartbeat
from storage._lock import named_lock
from storage._lock import rdb_backend
from storage._rdb import ResilientRDBStorage
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

__all__ = [
    "ENV_CONNECT_TIMEOUT",
    "ENV_STORAGE",
    "ENV_STORAGE_FILE",
    "HeartbeatThread",
    "ResilientRDBStorage",
    "StorageError",
    "StorageStatus",
    "StorageUnreachable",
    "adopt_orphans",
    "check_password",
    "check_storage",
    "classify",
    "connect_timeout",
    "create_storage",
    "default_storage_url",
    "heartbeat",
    "is_loopback",
    "is_proxy_url",
    "is_transient",
    "named_lock",
    "rdb_backend",
    "read_summary_trials",
    "read_user_attr",
    "redact_url",
    "resolve_storage_url",
    "sqlite_file",
    "storage_url_source",
    "scrub",
]
