"""The service's environment variables, all checked before a run or worker does any work.

Each variable is parsed where it is used, by a module that does not import torch; this asks
each of those parsers once, up front, so that a bad value is one line and exit 2 in a second,
not a traceback (or a silent default) after the training stack has loaded. Variables whose
users take any value (or fall back quietly) are checked here by the same rule they read with.
"""

from __future__ import annotations

import math
import os

from search.observe.artifacts import ENV_ARTIFACTS
from search.observe.tracking import ENV_INIT_TIMEOUT as ENV_WANDB_INIT_TIMEOUT
from search.worker.isolation import MMAP_THRESHOLD_ENV as ENV_MMAP_THRESHOLD


class SettingError(ValueError):
    """A service environment variable with a value its user cannot take (one line, exit 2)."""


def check_environment() -> None:
    """Ask every parser of the service's ``$SEARCH_*`` variables (the storage URL aside: the
    options resolve it).

    Raises:
        StorageError: ``$SEARCH_CONNECT_TIMEOUT``, ``$SEARCH_LOCK_TIMEOUT``,
            ``$SEARCH_HEARTBEAT_INTERVAL`` or ``$SEARCH_GRACE_PERIOD``.
        FlushSettingError: ``$SEARCH_EVENTS_FLUSH_S``.
        CacheSettingError: ``$SEARCH_DATA_CACHE_*_BYTES``.
        SettingError: ``$SEARCH_MALLOC_MMAP_THRESHOLD``, ``$SEARCH_WANDB_INIT_TIMEOUT``,
            ``$SEARCH_ARTIFACTS``.
    """
    from search.train.cache_settings import CacheSettings
    from search.worker.dispatch import flush_seconds
    from storage import check_heartbeat_env
    from storage import connect_timeout
    from storage import lock_timeout

    connect_timeout()
    lock_timeout()
    check_heartbeat_env()
    flush_seconds()
    CacheSettings.from_env()
    _check_mmap_threshold()
    _check_wandb_init_timeout()
    _check_artifacts()


def _text(name: str) -> str:
    return os.environ.get(name, "").strip()


def _check_mmap_threshold() -> None:
    text = _text(ENV_MMAP_THRESHOLD)
    if text and not text.isdigit():  # the worker reads digits, anything else as 0 (unset)
        raise SettingError(
            f"${ENV_MMAP_THRESHOLD} must be a whole number of bytes >= 0 (0: glibc's own "
            f"threshold), not {text!r}"
        )


def _check_wandb_init_timeout() -> None:
    text = _text(ENV_WANDB_INIT_TIMEOUT)
    if not text:
        return
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):  # the tracker falls back to its default
        raise SettingError(
            f"${ENV_WANDB_INIT_TIMEOUT} must be a number of seconds > 0, not {text!r}"
        )


def _check_artifacts() -> None:
    text = _text(ENV_ARTIFACTS)
    scheme, sep, _ = text.partition("://")
    if sep and scheme != "file":  # anything else would become a local directory "ftp:/..."
        raise SettingError(
            f"${ENV_ARTIFACTS} must be a directory or file://DIR, not {text!r} (an s3:// or "
            "gs:// store goes in the spec's artifacts.store)"
        )
