"""Heartbeats for a trial run with ask/tell (Optuna's own thread only runs in ``optimize``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
from optuna.storages import BaseStorage

from storage._ops import adopt_orphans_in
from storage.compat import BaseHeartbeat
from storage.compat import is_heartbeat_enabled
from storage.compat import rdb_backend
from storage.compat import study_id
from storage.compat import study_storage
from storage.compat import trial_id as trial_id_of

_logger = logging.getLogger(__name__)

# While the database is away, try again this often (seconds), not just once per interval.
_OUTAGE_RETRY = 1.0


class HeartbeatThread(threading.Thread):
    """Record a trial's heartbeat every ``interval`` seconds until stopped.

    Unlike Optuna's thread, an error (the database restarting) does not end the thread: it is
    logged once and retried every second until a heartbeat gets through again.

    Args:
        storage: A storage with heartbeats enabled.
        trial_id: The running trial's id.
        interval: Seconds between heartbeats.
        number: The trial's number, for log lines (looked up when not given).
    """

    def __init__(
        self, storage: BaseStorage, trial_id: int, interval: float, number: int | None = None
    ) -> None:
        super().__init__(name=f"heartbeat-{trial_id}", daemon=True)
        if not isinstance(storage, BaseHeartbeat):
            raise ValueError(f"storage has no heartbeat, but got {type(storage).__name__}.")
        if interval <= 0:
            raise ValueError(f"interval must be > 0, but got {interval=}.")
        self._storage = storage
        self._trial_id = trial_id
        self._number = number
        self._interval = interval
        self._stop_event = threading.Event()
        self.beats = 0

    def _label(self) -> str:
        """``trial N`` by the trial's number (what the dashboard and the report show)."""
        if self._number is None:
            try:
                self._number = self._storage.get_trial_number_from_id(self._trial_id)
            except Exception:  # the database is away: name the id for now
                return f"trial id {self._trial_id}"
        return f"trial {self._number}"

    def run(self) -> None:
        """Beat until :meth:`stop`."""
        failing = False
        try:
            while True:
                try:
                    self._storage.record_heartbeat(self._trial_id)
                    self.beats += 1
                    if failing:
                        _logger.warning("heartbeat of %s recorded again", self._label())
                    failing = False
                except Exception as error:  # the database is away: keep trying
                    if not failing:
                        _logger.warning(
                            "heartbeat of %s failed (%s); retrying",
                            self._label(),
                            type(error).__name__,
                        )
                    failing = True
                wait = min(_OUTAGE_RETRY, self._interval) if failing else self._interval
                if self._stop_event.wait(wait):
                    return
        finally:
            backend = rdb_backend(self._storage)
            if backend is not None:
                backend.remove_session()  # this thread's connection goes back to the pool

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop beating and wait (up to ``timeout`` s) for the thread to end."""
        self._stop_event.set()
        self.join(timeout)


@contextmanager
def heartbeat(study: optuna.Study, trial: optuna.trial.Trial) -> Iterator[None]:
    """Record heartbeats for ``trial`` in a background thread while the block runs.

    If this process dies, the heartbeats stop, and after the storage's grace period another
    worker fails the trial and re-queues its parameters (``search.budget.fail_stale``, up to the
    storage's ``RetryHeartbeatStaleTrialCallback`` ``max_retry``).
    A no-op when the storage has no heartbeat.

    Example:
        >>> import optuna
        >>> study = optuna.create_study()
        >>> trial = study.ask()
        >>> with heartbeat(study, trial):
        ...     pass

    Args:
        study: The trial's study.
        trial: A running trial, from ``study.ask()`` or ``search.budget.claim_trial``.
    """
    storage = study_storage(study)
    if not is_heartbeat_enabled(storage):
        yield
        return
    assert isinstance(storage, BaseHeartbeat)
    interval = storage.get_heartbeat_interval()
    assert interval is not None
    thread = HeartbeatThread(storage, trial_id_of(trial), interval, number=trial.number)
    thread.start()
    try:
        yield
    finally:
        thread.stop()


def adopt_orphans(study: optuna.Study) -> list[int]:
    """Give a first heartbeat to RUNNING trials that never had one and are older than the grace.

    Optuna only fails RUNNING trials whose heartbeat went stale; a trial whose worker died
    between taking it and its first heartbeat would stay RUNNING forever. Once adopted, such a
    trial goes stale after the grace period and is failed and re-queued like any other.

    Args:
        study: A study on an ``RDBStorage`` with heartbeats (anything else: nothing happens).

    Returns:
        The ids of the adopted trials.
    """
    storage = study_storage(study)
    remote = getattr(storage, "adopt_orphans", None)
    if remote is not None and is_heartbeat_enabled(storage):  # a search proxy does it
        return list(remote(study_id(study)))
    rdb = rdb_backend(storage)
    if rdb is None or not is_heartbeat_enabled(rdb):
        return []
    interval = rdb.get_heartbeat_interval()
    assert interval is not None
    grace = rdb.grace_period if rdb.grace_period is not None else 2 * interval
    return adopt_orphans_in(rdb, study_id(study), grace)
