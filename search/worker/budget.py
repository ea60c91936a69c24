"""The study's global budget of finished trials, enforced exactly across workers and machines.

How the budget is enforced
--------------------------
The budget ``N`` is stored with the study (study user attribute ``n_trials``) when the study is
created; naming a different ``N`` for an existing study is an error unless the change is asked
for (``--set-n-trials``). A worker takes a trial only through :func:`claim_trial`, which holds
one lock per study, shared by every process on every machine (PostgreSQL: an advisory lock
``pg_advisory_xact_lock`` on a connection of its own, released by the server if the worker
dies; SQLite: a file lock next to the database file). Under that lock it:

1. fails the RUNNING trials whose heartbeat is older than the grace period and re-queues each
   as a WAITING trial with the same parameters (up to the storage's ``max_retry`` times), the
   failure and its re-queue in one database transaction (:func:`fail_stale`); a running
   worker also does this every heartbeat interval on a thread of its own
   (:func:`watch_stale`), so a dead worker's trial is re-queued within the grace period plus
   one heartbeat interval even while every survivor is busy with a long trial;
2. counts the trials that spend the budget, the trials that trained: COMPLETE, PRUNED (by the
   pruner, or a real or host OOM) and RUNNING trials, and FAIL trials that were not re-queued
   (a FAIL trial whose number is in another trial's ``retry_history``, i.e. one that was
   retried or handed back, does not count: its re-run does). A preflight skip (PRUNED with
   ``oom_kind`` ``predicted`` or ``frontier``, :func:`is_skip`) is recorded like any trial, so
   the sampler learns from it, but costs milliseconds and does not spend the budget;
3. stops the run with :class:`SkipBoundError` (one line: the space does not fit the device)
   once the study holds ``max_skips`` skips and the budget is not spent yet, so a space where
   nothing fits cannot sample skips for ever (``study.max_skips_per_trial`` x ``N``);
4. takes a trial only if that count is below ``N`` -- a re-queued trial first (oldest first),
   then an enqueued one (``study.ask()`` pops WAITING trials in the order they were added),
   then a freshly sampled one -- and records its first heartbeat before releasing the lock.

The lock can expire under a holder paused past ``$SEARCH_LOCK_TIMEOUT`` (the server ends its
transaction; the proxy ends its lease), so the claim is fenced (``storage.fence_writes``): right
after taking the lock the worker writes a fresh token with the study, before it reads the
trials, and the trial it creates or sets RUNNING commits only if the token is still its own,
checked in the same transaction. A holder that lost the lock gets ``LockLost``, having written
no trial, and claims again from the start.

Every trial that spends the budget was taken under the lock while the count was below ``N``,
and a trial leaves the count only when its re-run is queued, so the count never exceeds ``N``
and the study ends with exactly ``N`` finished trials that trained (WAITING trials left over,
e.g. baselines beyond a small budget, do not count; neither do skips). A claimed trial counts
while RUNNING and leaves the count when it ends as a skip, so the count still never exceeds
``N``. When the count has reached ``N`` but other workers' trials are still RUNNING, a worker
does not exit at once: one of those trials could go stale (its worker died) and be re-queued,
and a live worker must run it. It polls (every heartbeat
interval, at most every 2 s) until no trial is RUNNING (then exits) or a re-queued trial
appears (then runs it). A worker handing back its trial on SIGTERM or SIGINT
(:func:`hand_back`) fails it with the user attribute ``handed_back`` and re-queues its
parameters under the same lock and in the same transaction, so it is counted once.

Through ``search proxy`` (``--storage grpc://host:port``) every step above is the same, but
the lock, the heartbeats, the stale query and the fail-and-re-queue transaction have no call in
Optuna's gRPC API: the proxy serves them as a second gRPC service and runs them on its own
database connection for the worker (``storage._proxy_client``). The proxy holds the advisory
lock while the worker's lock call is open and releases it when the worker leaves the lock,
dies (its connection closes) or holds it past ``$SEARCH_LOCK_TIMEOUT``; because it is the
same PostgreSQL advisory lock, workers on several proxies and workers straight on the
database can share one study.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record import attrs
from search.record.counts import budget_lock_name
from search.record.counts import skip_count
from search.record.counts import spent_count
from search.record.errors import RunError
from search.record.trial_record import handed_back_attrs
from search.record.trial_record import lost_attrs
from storage import BaseHeartbeat
from storage import LockLost
from storage import adopt_orphans
from storage import call_with_retry
from storage import compat
from storage import fail_and_enqueue
from storage import fence_writes
from storage import is_heartbeat_enabled
from storage import named_lock
from storage import rdb_backend

_logger = logging.getLogger(__name__)

# Keys of the trial record (search.record.attrs), kept importable from here.
HANDED_BACK = attrs.HANDED_BACK
RETRY_HISTORY = attrs.RETRY_HISTORY
FAILED_TRIAL = attrs.FAILED_TRIAL

MAX_POLL_S = 2.0  # default poll of a worker waiting for others' RUNNING trials


class BudgetError(ValueError):
    """The budget is missing, invalid or conflicts with the stored one; one-line message."""


class SkipBoundError(RunError):
    """The study skipped ``max_skips`` configs for memory before spending its budget (one line)."""


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
    with named_lock(compat.study_storage(study), budget_lock_name(study)):
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


def finished_count(study: optuna.Study) -> int:
    """Finished trials that spent the budget: :func:`spent_count` less the RUNNING ones."""
    trials = study.get_trials(deepcopy=False)
    return spent_count(trials) - sum(t.state == TrialState.RUNNING for t in trials)


BeforeAsk = Callable[[optuna.Study, Sequence[FrozenTrial]], Mapping[str, Any]]


@dataclass(frozen=True)
class StaleTrial:
    """A RUNNING trial whose heartbeat went stale, failed and re-queued by this worker."""

    number: int
    trial_id: int


@dataclass
class Claim:
    """A claimed trial and what the claim read.

    Args:
        trial: The RUNNING trial (its first heartbeat recorded).
        trials: The study's trials as read under the budget lock just before the claim (the
            claimed trial as it was then: WAITING, or absent when new). Fresh: the step hands
            it to the stage plan, the sampler, the preflight and the progress count instead
            of reading the trial list again.
        requeued: Stale trials this claim's sweep failed and re-queued (for observers, told
            after the lock is released).
    """

    trial: optuna.trial.Trial
    trials: list[FrozenTrial]
    requeued: list[StaleTrial] = field(default_factory=list)


def claim_trial(
    study: optuna.Study,
    budget: int,
    *,
    wait: bool = True,
    poll_interval: float | None = None,
    stop: Callable[[], bool] | None = None,
    max_skips: int | None = None,
    before_ask: BeforeAsk | None = None,
) -> optuna.trial.Trial | None:
    """Take the next trial if the study's budget allows it (:func:`claim`'s trial)."""
    taken = claim(
        study,
        budget,
        wait=wait,
        poll_interval=poll_interval,
        stop=stop,
        max_skips=max_skips,
        before_ask=before_ask,
    )
    return taken.trial if taken is not None else None


def claim(
    study: optuna.Study,
    budget: int,
    *,
    wait: bool = True,
    poll_interval: float | None = None,
    stop: Callable[[], bool] | None = None,
    max_skips: int | None = None,
    before_ask: BeforeAsk | None = None,
    on_requeued: Callable[[list[StaleTrial]], None] | None = None,
) -> Claim | None:
    """Take the next trial if the study's budget allows it (see the module docstring).

    Under the lock the study's trials are read once; the trial taken comes from that list (a
    re-queued one, then an enqueued one, oldest first) or is created, without another read.

    Args:
        study: The shared study.
        budget: The budget from :func:`ensure_budget`.
        wait: While the budget is spent but other trials are still RUNNING (and heartbeats
            are on), poll until they finish (return ``None``) or one is re-queued (take it).
        poll_interval: Seconds between polls; default the heartbeat interval, at most 2 s
            (a worker notices the study's end within 2 s).
        stop: Checked before each claim and during the polls; True returns ``None`` (a
            SIGTERM while the worker waits ends it within a tenth of a second).
        max_skips: Skips the study may hold while its budget is not spent; at that many,
            raise :class:`SkipBoundError` instead of claiming. ``None``: no bound.
        before_ask: Called under the lock with the study's trials before a trial that is not
            re-queued is taken (``search.sampling.stages.StagePlan``: picks the stage, may
            enqueue its seeds); returns user attributes for the new trial, which an enqueued
            trial's own attributes override. One with an ``enqueued`` attribute (StagePlan)
            lists there the ids of the trials it enqueued; for one without, the trial is
            taken with ``study.ask()`` (one more read of the trial list).
        on_requeued: Called after the lock is released with the stale trials the sweep failed
            and re-queued (not called when there were none).

    Returns:
        The claim, or ``None`` once nothing is left.

    Raises:
        SkipBoundError: The study holds ``max_skips`` skips and its budget is not spent.
    """
    storage = compat.study_storage(study)
    beating = is_heartbeat_enabled(storage)
    if poll_interval is None:
        poll_interval = 1.0
        if isinstance(storage, BaseHeartbeat):
            poll_interval = min(float(storage.get_heartbeat_interval() or 1), MAX_POLL_S)
    stopped = stop or (lambda: False)
    said_waiting = False
    while not stopped():
        requeued: list[StaleTrial] = []
        try:
            with (
                named_lock(storage, budget_lock_name(study)),
                _quiet_heartbeat_warnings(),
                fence_writes(storage, compat.study_id(study)),  # before the trials are read
            ):
                if beating:
                    requeued = _sweep(study)
                trials = study.get_trials(deepcopy=False)  # the step's one read of the list
                spent = spent_count(trials)
                if spent < budget:
                    skips = skip_count(trials)
                    if max_skips is not None and skips >= max_skips:
                        raise SkipBoundError(
                            f"study {study.study_name!r}: {skips} configs skipped for memory "
                            f"(predicted or frontier OOM) with only {spent} of {budget} trials "
                            f"trained: the space does not fit the device; narrow "
                            f"space.batch_size / space.max_len or add space.conditions, or use "
                            f"a bigger device"
                        )
                    trial = _take(study, trials, before_ask)
                    if isinstance(storage, BaseHeartbeat) and beating:
                        first_beat = functools.partial(
                            storage.record_heartbeat, compat.trial_id(trial)
                        )
                        _retried(storage, first_beat, "first heartbeat")
                    return Claim(trial, trials, requeued)
                running = any(t.state == TrialState.RUNNING for t in trials)
        except LockLost as lost:  # paused past the lock timeout: another worker claimed since
            _logger.warning("study %s: %s", study.study_name, lost)
            compat.forget_cached_trials(study)
            continue
        finally:
            if requeued and on_requeued is not None:
                on_requeued(requeued)
        if not (wait and beating and running):
            return None
        if not said_waiting:
            _logger.warning(
                "study %s: budget of %d spent; waiting for the running trials of other workers "
                "(one that is re-queued runs here)",
                study.study_name,
                budget,
            )
            said_waiting = True
        until = time.monotonic() + poll_interval
        while not stopped() and time.monotonic() < until:
            time.sleep(min(0.1, max(0.0, until - time.monotonic())))
    return None


def _retried(storage: optuna.storages.BaseStorage, fn: Callable[[], Any], what: str) -> Any:
    """``fn()``, again while the database is briefly away (a dropped or killed connection)."""
    max_wait = float(getattr(rdb_backend(storage), "max_wait", 120.0))
    return call_with_retry(fn, max_wait=max_wait, what=what)


def _take(
    study: optuna.Study, trials: Sequence[FrozenTrial], before_ask: BeforeAsk | None
) -> optuna.trial.Trial:
    """Under the lock: a re-queued trial, else (after ``before_ask``) an enqueued one, else a
    new one; from ``trials`` and the ids ``before_ask`` enqueued, without reading them again."""
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    retried = [t for t in waiting if t.system_attrs.get(RETRY_HISTORY)]
    trial = _pop(study, [compat.trial_id(t) for t in retried])
    if trial is not None:
        return trial
    new_attrs = before_ask(study, trials) if before_ask is not None else {}
    if before_ask is not None and not hasattr(before_ask, "enqueued"):
        trial = study.ask()  # it may have enqueued trials this list does not hold
    else:
        queued = [compat.trial_id(t) for t in waiting if not t.system_attrs.get(RETRY_HISTORY)]
        queued += list(getattr(before_ask, "enqueued", ()))
        trial = _pop(study, queued)
        if trial is None:
            storage = compat.study_storage(study)
            trial = optuna.trial.Trial(study, storage.create_new_trial(compat.study_id(study)))
    for key, value in new_attrs.items():
        if key not in trial.user_attrs:  # an enqueued trial keeps its own
            trial.set_user_attr(key, value)
    return trial


def _pop(study: optuna.Study, ids: Sequence[int]) -> optuna.trial.Trial | None:
    """The first of the WAITING trials ``ids`` that this worker sets RUNNING (as ``ask`` pops)."""
    storage = compat.study_storage(study)
    for waiting_id in ids:
        try:
            if not storage.set_trial_state_values(waiting_id, state=TrialState.RUNNING):
                continue
        except UpdateFinishedTrialError:
            continue
        return optuna.trial.Trial(study, waiting_id)
    return None


def fail_and_requeue(
    study: optuna.Study,
    trial_id: int,
    *,
    user_attrs: Mapping[str, Any] | None = None,
    max_retry: int | None = None,
) -> FrozenTrial | None:
    """Fail a RUNNING trial and queue a WAITING copy of it, in one database transaction.

    The failure and the re-queue commit together or not at all, so there is no moment at
    which the trial is FAIL without its copy (a FAIL trial without a copy would spend the
    budget for nothing). Two processes racing for the same trial cannot both win: the trial's
    row is locked and its state checked inside the transaction. Without an RDB backend
    (in-memory studies) the two steps run one after the other.

    Args:
        study: The trial's study.
        trial_id: The trial's database id.
        user_attrs: User attributes to set on the failed trial (e.g. ``handed_back``).
        max_retry: Do not queue a copy once the trial's retry history is this long (the trial
            is still failed); ``None`` always queues one.

    Returns:
        The failed trial as it was before failing, or ``None`` if it was not RUNNING.
    """
    storage = compat.study_storage(study)
    frozen = storage.get_trial(trial_id)
    if frozen.state != TrialState.RUNNING:
        return None
    history = [*frozen.system_attrs.get(RETRY_HISTORY, ()), frozen.number]
    copy = None
    if max_retry is None or len(history) <= max_retry:
        copy = optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=frozen.params,
            distributions=frozen.distributions,
            user_attrs=frozen.user_attrs,
            system_attrs={
                **frozen.system_attrs,
                FAILED_TRIAL: frozen.system_attrs.get(FAILED_TRIAL, frozen.number),
                RETRY_HISTORY: history,
            },
        )
    # One transaction in the database (or by the search proxy in front of it), retried while
    # the database is away with one client token: a commit whose answer was lost is found,
    # not taken for someone else's failure. Not inside _retried: each attempt of an outer
    # retry would bring a new token.
    done = fail_and_enqueue(storage, compat.study_id(study), trial_id, user_attrs or {}, copy)
    if done is None:  # no database (in-memory studies): two steps
        for key, value in (user_attrs or {}).items():
            storage.set_trial_user_attr(trial_id, key, value)
        try:
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            return None
        if copy is not None:
            study.add_trial(copy)
        return frozen
    compat.forget_cached_trials(study)
    return frozen if done else None


@contextmanager
def _quiet_heartbeat_warnings() -> Iterator[None]:
    """Optuna's experimental-heartbeat warnings, expected here, not shown to the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield


def _sweep(study: optuna.Study) -> list[StaleTrial]:
    """Under the budget lock: adopt orphaned RUNNING trials, fail and re-queue stale ones."""
    _retried(compat.study_storage(study), lambda: adopt_orphans(study), "adopt orphans")
    return requeue_stale(study)


def fail_stale(study: optuna.Study) -> list[int]:
    """Fail the study's RUNNING trials whose heartbeat is stale, and re-queue each.

    Call under the budget lock (:func:`requeue_stale`).

    Returns:
        The numbers of the trials failed here.
    """
    return [stale.number for stale in requeue_stale(study)]


def requeue_stale(study: optuna.Study) -> list[StaleTrial]:
    """Fail the study's RUNNING trials whose heartbeat is stale, and re-queue each.

    Call under the budget lock, and nothing else there: the caller tells observers about the
    trials returned after releasing it. Each failure and its re-queue are one transaction
    (:func:`fail_and_requeue`); the copy is queued up to the storage's ``max_retry`` times
    (``RetryHeartbeatStaleTrialCallback``'s setting), as Optuna's ``fail_stale_trials`` would.

    Returns:
        The trials failed here.
    """
    storage = compat.study_storage(study)
    if not isinstance(storage, BaseHeartbeat) or not is_heartbeat_enabled(storage):
        return []
    failed = []
    for stale_id in compat.stale_trial_ids(storage, compat.study_id(study)):
        frozen = fail_and_requeue(
            study, stale_id, user_attrs=lost_attrs(), max_retry=compat.stale_retry_limit(storage)
        )
        if frozen is not None:
            failed.append(StaleTrial(frozen.number, stale_id))
            _logger.warning(
                "trial %d had no heartbeat for the grace period: failed and re-queued",
                frozen.number,
            )
    return failed


class _StaleWatcher(threading.Thread):
    """Fail and re-queue stale trials every ``interval`` seconds, under the budget lock."""

    def __init__(
        self,
        study: optuna.Study,
        interval: float,
        on_requeued: Callable[[list[StaleTrial]], None] | None = None,
    ) -> None:
        super().__init__(name="stale-watcher", daemon=True)
        self._study = study
        self._interval = interval
        self._on_requeued = on_requeued
        self._stop_event = threading.Event()

    def run(self) -> None:
        storage = compat.study_storage(self._study)
        try:
            while not self._stop_event.wait(self._interval):
                try:
                    lock = named_lock(storage, budget_lock_name(self._study))
                    with lock, _quiet_heartbeat_warnings():
                        requeued = _sweep(self._study)
                except Exception as error:  # the database is away: the next round retries
                    _logger.debug("stale check failed (%s)", type(error).__name__)
                    continue
                if requeued and self._on_requeued is not None:  # after the lock
                    self._on_requeued(requeued)
        finally:
            backend = rdb_backend(storage)
            if backend is not None:
                backend.remove_session()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop_event.set()
        self.join(timeout)


@contextmanager
def watch_stale(
    study: optuna.Study, on_requeued: Callable[[list[StaleTrial]], None] | None = None
) -> Iterator[None]:
    """While the block runs, fail and re-queue stale trials every heartbeat interval.

    A worker busy with a long trial does not claim, so without this a dead worker's trial
    would wait for some survivor's trial to end. The check runs on a thread of its own, next
    to the heartbeat thread rather than on it: waiting for the budget lock must never delay
    this worker's own heartbeat. ``on_requeued`` gets the trials each sweep re-queued, after
    the lock is released (it must not block: the worker's event dispatcher queues them). A
    no-op without heartbeats.
    """
    storage = compat.study_storage(study)
    if not isinstance(storage, BaseHeartbeat) or not is_heartbeat_enabled(storage):
        yield
        return
    interval = float(storage.get_heartbeat_interval() or 1)
    watcher = _StaleWatcher(study, interval, on_requeued)
    watcher.start()
    try:
        yield
    finally:
        watcher.stop()


def hand_back(study: optuna.Study, trial: optuna.trial.Trial) -> bool:
    """Give a running trial back (SIGTERM, SIGINT): fail it as ``handed_back``, re-queue it.

    The failure and the re-queue are one transaction under the budget lock
    (:func:`fail_and_requeue`): a worker that dies in the middle leaves either a RUNNING trial
    (failed and re-queued later as stale) or a failed trial with its copy, never a FAIL
    without its copy, and the trial is counted once. A trial that is no longer RUNNING
    (already told, or failed as stale and re-queued by someone else) is left alone. The caller
    keeps signals from interrupting this (``search.worker.runner`` sets a flag in its handlers).

    Args:
        study: The trial's study.
        trial: The trial this worker was running.

    Returns:
        Whether the trial was handed back.
    """
    with named_lock(compat.study_storage(study), budget_lock_name(study)):
        frozen = fail_and_requeue(study, compat.trial_id(trial), user_attrs=handed_back_attrs())
    if frozen is None:
        return False
    _logger.warning("trial %d handed back and re-queued", frozen.number)
    return True
