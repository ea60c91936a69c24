"""The study's global budget of finished trials, enforced exactly across workers and machines.

How the budget is enforced
--------------------------
The budget ``N`` is stored with the study (study user attribute ``n_trials``) when the study is
created; naming a different ``N`` for an existing study is an error unless the change is asked
for (``--set-n-trials``). A worker takes a trial only through :func:`claim_trial`, which holds
one lock per study, shared by every process on every machine (PostgreSQL: an advisory lock
``pg_advisory_xact_lock`` on a connection of its own, released by the server if the worker
dies; SQLite: a file lock next to the database file). Under that lock it:

1. fails the RUNNING trials whose heartbeat is older than the grace period; Optuna's
   ``RetryHeartbeatStaleTrialCallback`` re-queues each as a WAITING trial with the same
   parameters (up to ``max_retry`` times);
2. counts the trials that spend the budget: COMPLETE, PRUNED and RUNNING trials, and FAIL
   trials that were not re-queued (a FAIL trial whose number is in another trial's
   ``retry_history``, i.e. one that was retried or handed back, does not count: its re-run does);
3. takes a trial (``study.ask()``, which pops a WAITING re-queued or enqueued trial first) only
   if that count is below ``N``, and records its first heartbeat before releasing the lock.

Every trial that spends the budget was taken under the lock while the count was below ``N``,
and a trial leaves the count only when its re-run is queued, so the count never exceeds ``N``
and the study ends with exactly ``N`` finished trials (WAITING trials left over, e.g. baselines
beyond a small budget, do not count). When the count has reached ``N`` but other workers'
trials are still RUNNING, a worker does not exit at once: one of those trials could go stale
(its worker died) and be re-queued, and a live worker must run it. It polls (every heartbeat
interval, at most every 2 s) until no trial is RUNNING (then exits) or a re-queued trial
appears (then runs it). A worker handing back its trial on SIGTERM (:func:`hand_back`) fails
it with the user attribute ``handed_back`` and re-queues its parameters under the same lock,
so it is counted once.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search import attrs
from storage import adopt_orphans
from storage import named_lock

_logger = logging.getLogger(__name__)

HANDED_BACK = "handed_back"  # trial user attr: given back on SIGTERM, re-queued
RETRY_HISTORY = "retry_history"  # Optuna's system attr (RetryHeartbeatStaleTrialCallback)
FAILED_TRIAL = "failed_trial"  # Optuna's system attr: the number of the original trial

MAX_POLL_S = 2.0  # default poll of a worker waiting for others' RUNNING trials
_SPENT_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class BudgetError(ValueError):
    """The budget is missing, invalid or conflicts with the stored one; one-line message."""


def _lock_name(study: optuna.Study) -> str:
    return f"budget:{study.study_name}"


def ensure_budget(study: optuna.Study, n_trials: int | None, *, change: bool = False) -> int:
    """The study's budget of finished trials, stored on first use.

    Args:
        study: The study.
        n_trials: The budget asked for (``--n-trials``); ``None`` uses the stored one.
        change: Replace a stored budget that differs (``--set-n-trials``).

    Returns:
        The budget in force.

    Raises:
        BudgetError: ``n_trials`` is below 1, none is stored and none is given, or it differs
            from the stored one without ``change``.
    """
    if n_trials is not None and n_trials < 1:
        raise BudgetError(f"--n-trials must be at least 1, but got {n_trials}")
    with named_lock(study._storage, _lock_name(study)):
        stored = study.user_attrs.get(attrs.STUDY_N_TRIALS)
        if n_trials is None:
            if stored is None:
                raise BudgetError(
                    f"study {study.study_name!r} has no trial budget yet: pass --n-trials N"
                )
            return int(stored)
        if stored is not None and int(stored) != n_trials:
            if not change:
                raise BudgetError(
                    f"study {study.study_name!r} has a budget of {stored} finished trials, not "
                    f"{n_trials}: leave --n-trials out, or add --set-n-trials to change it"
                )
            _logger.warning(
                "study %s: budget changed from %s to %d", study.study_name, stored, n_trials
            )
        if stored is None or int(stored) != n_trials:
            study.set_user_attr(attrs.STUDY_N_TRIALS, n_trials)
        return n_trials


def requeued_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of trials whose re-run was queued (they appear in some trial's retry history)."""
    return {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY, ())}


def spent_count(trials: Sequence[FrozenTrial]) -> int:
    """Trials that spend the budget: COMPLETE, PRUNED, RUNNING, and FAIL not re-queued."""
    requeued = requeued_numbers(trials)
    return sum(
        t.state in _SPENT_STATES or (t.state == TrialState.FAIL and t.number not in requeued)
        for t in trials
    )


def finished_count(study: optuna.Study) -> int:
    """Finished trials that count toward the budget: COMPLETE, PRUNED, FAIL not re-queued."""
    trials = study.get_trials(deepcopy=False)
    return spent_count(trials) - sum(t.state == TrialState.RUNNING for t in trials)


def claim_trial(
    study: optuna.Study,
    budget: int,
    *,
    wait: bool = True,
    poll_interval: float | None = None,
) -> optuna.trial.Trial | None:
    """Take the next trial if the study's budget allows it (see the module docstring).

    Args:
        study: The shared study.
        budget: The budget from :func:`ensure_budget`.
        wait: While the budget is spent but other trials are still RUNNING (and heartbeats
            are on), poll until they finish (return ``None``) or one is re-queued (take it).
        poll_interval: Seconds between polls; default the heartbeat interval, at most 2 s
            (a worker notices the study's end within 2 s).

    Returns:
        A RUNNING trial (its first heartbeat recorded), or ``None`` once nothing is left.
    """
    storage = study._storage
    beating = is_heartbeat_enabled(storage)
    if poll_interval is None:
        poll_interval = 1.0
        if isinstance(storage, BaseHeartbeat):
            poll_interval = min(float(storage.get_heartbeat_interval() or 1), MAX_POLL_S)
    while True:
        with named_lock(storage, _lock_name(study)), warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            if beating:
                adopt_orphans(study)
                fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            if spent_count(trials) < budget:
                trial = study.ask()
                if isinstance(storage, BaseHeartbeat) and beating:
                    storage.record_heartbeat(trial._trial_id)
                return trial
            running = any(t.state == TrialState.RUNNING for t in trials)
        if not (wait and beating and running):
            return None
        time.sleep(poll_interval)


def hand_back(study: optuna.Study, trial: optuna.trial.Trial) -> None:
    """Give a running trial back (SIGTERM): fail it as ``handed_back`` and re-queue its params.

    The FAIL trial stops counting once its copy is queued, under the budget lock, so the trial
    is counted once. A trial that is no longer RUNNING (already told, or failed as stale and
    re-queued by someone else) is left alone.

    Args:
        study: The trial's study.
        trial: The trial this worker was running.
    """
    storage = study._storage
    with named_lock(storage, _lock_name(study)):
        frozen = storage.get_trial(trial._trial_id)
        if frozen.state != TrialState.RUNNING:
            return
        storage.set_trial_user_attr(trial._trial_id, HANDED_BACK, True)
        try:
            study.tell(trial, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            return
        history = [*frozen.system_attrs.get(RETRY_HISTORY, ()), frozen.number]
        system_attrs = {
            **frozen.system_attrs,
            FAILED_TRIAL: frozen.system_attrs.get(FAILED_TRIAL, frozen.number),
            RETRY_HISTORY: history,
        }
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=frozen.params,
                distributions=frozen.distributions,
                user_attrs=frozen.user_attrs,
                system_attrs=system_attrs,
            )
        )
    _logger.warning("trial %d handed back and re-queued", frozen.number)
