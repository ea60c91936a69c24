"""Tests of search/worker/budget.py: the global budget, claims, stale trials and hand-backs."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from _cli_workers import WorkerProcess
from _cli_workers import assert_budget_spent_exactly
from _cli_workers import stop_all
from _cli_workers import study_trials
from optuna.trial import TrialState

from search.record import attrs
from search.record.counts import spent_count
from search.worker.budget import HANDED_BACK
from search.worker.budget import BudgetError
from search.worker.budget import claim_trial
from search.worker.budget import ensure_budget
from search.worker.budget import fail_and_requeue
from search.worker.budget import fail_stale
from search.worker.budget import finished_count
from search.worker.budget import hand_back
from search.worker.budget import watch_stale
from storage import create_storage
from storage import heartbeat

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
]


def _study(tmp_path: Path, **kwargs: int | None) -> optuna.Study:
    store = create_storage(f"sqlite:///{tmp_path}/b.db", **kwargs)  # type: ignore[arg-type]
    return optuna.create_study(storage=store, study_name="b", direction="maximize")


def _run(study: optuna.Study, trial: optuna.Trial) -> None:
    with heartbeat(study, trial):
        x = trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, x)


def test_ensure_budget_stores_reads_conflicts_and_changes(tmp_path: Path) -> None:
    study = _study(tmp_path)
    with pytest.raises(BudgetError, match="no trial budget"):
        ensure_budget(study, None)
    assert ensure_budget(study, 12) == 12
    assert study.user_attrs[attrs.STUDY_N_TRIALS] == 12
    assert ensure_budget(study, None) == 12
    assert ensure_budget(study, 12) == 12
    with pytest.raises(BudgetError, match="budget of 12 .*--set-n-trials") as info:
        ensure_budget(study, 20)
    assert "\n" not in str(info.value)
    assert ensure_budget(study, 20, change=True) == 20
    assert ensure_budget(study, None) == 20
    with pytest.raises(BudgetError, match="at least 1"):
        ensure_budget(study, 0)


def test_claims_stop_exactly_at_the_budget(tmp_path: Path) -> None:
    study = _study(tmp_path, heartbeat_interval=1)
    study.enqueue_trial({"x": 0.25})
    claimed = []
    while (trial := claim_trial(study, 3)) is not None:
        claimed.append(trial.number)
        _run(study, trial)
    assert claimed == [0, 1, 2]
    assert study.trials[0].params == {"x": 0.25}  # the enqueued trial is taken first
    assert finished_count(study) == 3


def test_failed_trials_count_but_waiting_ones_do_not(tmp_path: Path) -> None:
    study = _study(tmp_path)
    trial = claim_trial(study, 2)
    assert trial is not None
    study.tell(trial, state=TrialState.FAIL)
    study.enqueue_trial({"x": 0.5})
    study.enqueue_trial({"x": 0.6})
    assert spent_count(study.get_trials()) == 1
    second = claim_trial(study, 2)
    assert second is not None
    _run(study, second)
    assert claim_trial(study, 2) is None
    assert finished_count(study) == 2
    assert [t.state for t in study.trials].count(TrialState.WAITING) == 1


def test_hand_back_requeues_once_and_counts_once(tmp_path: Path) -> None:
    study = _study(tmp_path, heartbeat_interval=1)
    trial = claim_trial(study, 2)
    assert trial is not None
    x = trial.suggest_float("x", 0.0, 1.0)
    hand_back(study, trial)
    hand_back(study, trial)  # a second SIGTERM: nothing more
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[0].user_attrs[HANDED_BACK] is True
    assert HANDED_BACK not in study.trials[1].user_attrs
    assert finished_count(study) == 0
    again = claim_trial(study, 2)
    assert again is not None and again.number == 1
    assert again.params == {"x": x}
    _run(study, again)
    last = claim_trial(study, 2)
    assert last is not None
    _run(study, last)
    assert claim_trial(study, 2) is None
    assert finished_count(study) == 2
    assert len(study.trials) == 3


def test_hand_back_leaves_a_finished_trial_alone(tmp_path: Path) -> None:
    study = _study(tmp_path)
    trial = claim_trial(study, 1)
    assert trial is not None
    _run(study, trial)
    hand_back(study, trial)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_stale_trial_is_failed_and_its_params_rerun(tmp_path: Path) -> None:
    study = _study(tmp_path, heartbeat_interval=1, grace_period=1)
    dead = claim_trial(study, 2)  # its worker "dies": no heartbeat after the first
    assert dead is not None
    x = dead.suggest_float("x", 0.0, 1.0)
    time.sleep(2.2)
    rerun = claim_trial(study, 2)
    assert rerun is not None
    assert study.trials[0].state == TrialState.FAIL
    assert rerun.params == {"x": x}
    _run(study, rerun)
    other = claim_trial(study, 2)
    assert other is not None
    _run(study, other)
    assert claim_trial(study, 2) is None
    assert finished_count(study) == 2


def test_a_trial_running_without_heartbeat_is_adopted_then_rerun(tmp_path: Path) -> None:
    study = _study(tmp_path, heartbeat_interval=1, grace_period=1)
    orphan = study.ask()  # as if its worker died before its first heartbeat
    orphan.suggest_float("x", 0.0, 1.0)
    time.sleep(1.2)
    first = claim_trial(study, 2)  # adopts the orphan (gives it a heartbeat)
    assert first is not None
    _run(study, first)
    assert study.trials[0].state == TrialState.RUNNING
    time.sleep(2.2)
    rerun = claim_trial(study, 2)
    assert rerun is not None
    assert study.trials[0].state == TrialState.FAIL
    assert rerun.params == study.trials[0].params


def test_a_worker_waits_for_running_trials_before_it_exits(tmp_path: Path) -> None:
    study = _study(tmp_path, heartbeat_interval=1)
    busy = claim_trial(study, 1)
    assert busy is not None
    result: list[object] = []
    waiter = threading.Thread(
        target=lambda: result.append(claim_trial(study, 1, poll_interval=0.1))
    )
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # the budget is spent, but the running trial might still go stale
    study.tell(busy, 1.0)
    waiter.join(5)
    assert result == [None]
    assert claim_trial(study, 1, wait=False) is None


def test_a_requeued_trial_runs_before_enqueued_and_fresh_ones(tmp_path: Path) -> None:
    study = _study(tmp_path, heartbeat_interval=1, grace_period=1)
    dead = claim_trial(study, 5)
    assert dead is not None
    x = dead.suggest_float("x", 0.0, 1.0)
    study.enqueue_trial({"x": 0.125})  # e.g. a baseline still waiting
    time.sleep(2.2)  # the first trial goes stale
    first = claim_trial(study, 5)
    assert first is not None
    assert study.trials[0].state == TrialState.FAIL
    assert first.number == 2 and first.params == {"x": x}  # the copy, not the baseline (1)
    _run(study, first)
    second = claim_trial(study, 5)
    assert second is not None and second.number == 1
    assert second.suggest_float("x", 0.0, 1.0) == 0.125  # then the enqueued baseline


def test_fail_and_requeue_is_one_step_and_happens_once(tmp_path: Path) -> None:
    study = _study(tmp_path, heartbeat_interval=1)
    trial = claim_trial(study, 2)
    assert trial is not None
    trial.suggest_float("x", 0.0, 1.0)
    frozen = fail_and_requeue(study, trial._trial_id, user_attrs={HANDED_BACK: True})
    assert frozen is not None and frozen.number == 0
    assert fail_and_requeue(study, trial._trial_id) is None  # no longer RUNNING: nothing
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs[HANDED_BACK] is True
    assert trials[1].system_attrs["retry_history"] == [0]
    assert trials[1].system_attrs["failed_trial"] == 0
    assert trials[1].params == trials[0].params
    assert spent_count(trials) == 0


def test_fail_stale_stops_requeueing_after_max_retry(tmp_path: Path) -> None:
    store = create_storage(
        f"sqlite:///{tmp_path}/r.db", heartbeat_interval=1, grace_period=1, max_retry=1
    )
    study = optuna.create_study(storage=store, study_name="r", direction="maximize")
    first = claim_trial(study, 3)
    assert first is not None
    first.suggest_float("x", 0.0, 1.0)
    time.sleep(2.2)
    assert fail_stale(study) == [0]  # re-queued once (as trial 1)
    retry = claim_trial(study, 3)
    assert retry is not None and retry.number == 1
    time.sleep(2.2)
    assert fail_stale(study) == [1]  # failed, but max_retry=1: no third copy
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert spent_count(trials) == 1  # the last failure spends the budget


def test_watch_stale_requeues_while_nobody_claims(tmp_path: Path) -> None:
    study = _study(tmp_path, heartbeat_interval=1, grace_period=1)
    dead = claim_trial(study, 3)
    assert dead is not None
    dead.suggest_float("x", 0.0, 1.0)
    started = time.monotonic()
    with watch_stale(study):  # a survivor busy with its own trial
        while time.monotonic() - started < 15:
            if any(t.state == TrialState.WAITING for t in study.get_trials()):
                break
            time.sleep(0.1)
        took = time.monotonic() - started
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    assert took < 1 + 1 + 3  # grace + interval + margin


def test_claim_returns_none_when_told_to_stop(tmp_path: Path) -> None:
    study = _study(tmp_path, heartbeat_interval=1)
    busy = claim_trial(study, 1)
    assert busy is not None
    flag: list[bool] = []
    threading.Timer(0.3, lambda: flag.append(True)).start()
    started = time.monotonic()
    assert claim_trial(study, 1, poll_interval=2.0, stop=lambda: bool(flag)) is None
    assert time.monotonic() - started < 1.5  # not a whole poll interval after the stop


def test_log_lines_name_the_trial_number_not_its_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = create_storage(f"sqlite:///{tmp_path}/n.db", heartbeat_interval=1, grace_period=1)
    other = optuna.create_study(storage=store, study_name="other")
    for _ in range(5):  # trial ids 0-4 belong to another study
        other.add_trial(optuna.trial.create_trial(value=0.0))
    study = optuna.create_study(storage=store, study_name="n", direction="maximize")
    orphan = study.ask()
    assert orphan.number == 0 and orphan._trial_id != 0
    time.sleep(1.2)
    with caplog.at_level("WARNING"):
        first = claim_trial(study, 3)  # adopts the orphan
        assert first is not None
        _run(study, first)
        time.sleep(2.2)
        claim_trial(study, 3)  # fails and re-queues it
    text = caplog.text
    assert "trial 0 is RUNNING without a heartbeat" in text
    assert "trial 0 had no heartbeat for the grace period: failed and re-queued" in text
    assert f"trial {orphan._trial_id} " not in text and "trial id" not in text


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test started; whatever is left is killed with its trial child."""
    started: list[WorkerProcess] = []
    yield started
    stop_all(started)


@pytest.mark.postgres
def test_three_search_workers_share_a_budget_of_twelve_exactly(
    pg_url: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """Three real ``search worker`` processes on one study: twelve trials, each run once."""
    study = f"budget-{uuid.uuid4().hex[:8]}"
    workers += [WorkerProcess(pg_url, study, 12, tmp_path, f"w{i}") for i in range(3)]
    for worker in workers:
        worker.assert_exited_cleanly()
    trials = study_trials(pg_url, study)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 12  # nothing failed or extra
    assert [t.number for t in trials] == list(range(12))
    assert_budget_spent_exactly(trials, 12, workers)
    assert sum(w.trials_run() for w in workers) == 12  # the workers' own counts add up
    store = create_storage(pg_url, heartbeat_interval=None)
    loaded = optuna.load_study(study_name=study, storage=store)
    assert loaded.user_attrs[attrs.STUDY_N_TRIALS] == 12
    assert finished_count(loaded) == 12
    assert sum("fixed_params" in t.system_attrs for t in trials) == 1  # one baseline, once
