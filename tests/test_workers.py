"""Many real ``search worker`` processes on one PostgreSQL study: a killed worker, a DB restart.

Every worker is the product's CLI with its stale watcher, trial record and isolated trial
child (``tests/_cli_workers.py``); only the training is ``tests/fixtures/slow_objective.py``,
which sleeps and reports a metric, so a trial takes a second, not minutes. The last test runs
the real training (``--tiny``). Signals (SIGTERM, SIGINT) and the other faults are in
``tests/test_worker_faults.py``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from _cli_workers import WorkerProcess
from _cli_workers import assert_budget_spent_exactly
from _cli_workers import copies_of
from _cli_workers import pid_of
from _cli_workers import running_of
from _cli_workers import stop_all
from _cli_workers import study_trials
from _cli_workers import wait_for
from optuna.trial import TrialState
from sqlalchemy.pool import NullPool

from search.record import attrs
from search.worker.budget import finished_count
from storage import create_storage

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
# How the restart test restarts the server (Debian's cluster tools by default, as .ci/run).
_PG_VERSIONS = sorted(p.name for p in Path("/etc/postgresql").glob("*")) or ["15"]
PG_RESTART = os.environ.get(
    "SEARCH_TEST_PG_RESTART",
    f"pg_ctlcluster --skip-systemctl-redirect {_PG_VERSIONS[0]} main restart",
)


def _reachable(url: str, timeout: int = 3) -> str | None:
    engine = sqlalchemy.create_engine(
        url, poolclass=NullPool, connect_args={"connect_timeout": timeout}
    )
    try:
        with engine.connect():
            return None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        return str(exc).splitlines()[0]
    finally:
        engine.dispose()


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test started; whatever is left is killed with its trial child."""
    started: list[WorkerProcess] = []
    yield started
    stop_all(started)


def test_a_killed_workers_trial_is_rerun_by_a_survivor(
    pg_url: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """Three workers, a budget of eight; one is SIGKILLed (with its trial child) mid-trial.

    The victim's trials train for minutes, so it is surely inside one when it is killed;
    the survivors' take a second. A survivor fails the dead trial as stale, re-queues its
    parameters and runs them: the study still ends at exactly eight finished trials.
    """
    study, budget = f"kill-{uuid.uuid4().hex[:8]}", 8
    victim = WorkerProcess(pg_url, study, budget, tmp_path, "victim", epochs=3000, epoch_s=0.1)
    survivors = [WorkerProcess(pg_url, study, budget, tmp_path, f"s{i}") for i in range(2)]
    workers += [victim, *survivors]

    def victim_training() -> bool:
        assert victim.alive(), victim.stderr()
        return victim.training() and running_of(pg_url, study, victim) is not None

    wait_for("the victim to train a trial", victim_training, 180)
    dead = running_of(pg_url, study, victim)
    assert dead is not None
    victim.kill_group()
    for worker in survivors:
        worker.assert_exited_cleanly()
    assert victim.children_gone()
    trials = study_trials(pg_url, study)
    assert_budget_spent_exactly(trials, budget, workers)
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [dead.number]
    rerun = copies_of(trials, dead.number)
    assert len(rerun) == 1 and rerun[0].state == TrialState.COMPLETE
    assert rerun[0].params == dead.params
    assert pid_of(rerun[0]) in {w.pid for w in survivors}
    assert any(
        f"trial {dead.number} had no heartbeat for the grace period: failed and re-queued"
        in w.stderr()
        for w in survivors
    )


@pytest.mark.pg_restart
def test_workers_ride_out_a_postgres_restart(
    pg_url: str, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """Two workers, a budget of ten; the server restarts while trials run. A 20-second grace
    period outlasts the restart: nothing is lost, failed or run twice, both exit 0."""
    tool = shlex.split(PG_RESTART)[0]
    if shutil.which(tool) is None:
        pytest.skip(f"cannot restart PostgreSQL here: {tool} not found (SEARCH_TEST_PG_RESTART)")
    study, budget = f"restart-{uuid.uuid4().hex[:8]}", 10
    workers += [
        WorkerProcess(pg_url, study, budget, tmp_path, f"w{i}", epochs=2, epoch_s=0.5,
               env={"SEARCH_GRACE_PERIOD": "20"})
        for i in range(2)
    ]  # fmt: skip

    def midway() -> bool:
        for worker in workers:
            assert worker.alive(), worker.stderr()
        trials = study_trials(pg_url, study)
        done = sum(t.state == TrialState.COMPLETE for t in trials)
        return done >= 2 and any(t.state == TrialState.RUNNING for t in trials)

    wait_for("two finished trials and one running", midway, 180)
    restart = subprocess.run(shlex.split(PG_RESTART), capture_output=True, text=True)
    try:
        assert restart.returncode == 0, restart.stderr
        for worker in workers:
            worker.assert_exited_cleanly()
    finally:
        deadline = time.monotonic() + 60
        while _reachable(pg_url) is not None and time.monotonic() < deadline:
            time.sleep(0.5)  # leave the server running for whoever comes next
    trials = study_trials(pg_url, study)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * budget  # none failed or extra
    assert_budget_spent_exactly(trials, budget, workers)


TINY_SPEC = ROOT / "tests" / "fixtures" / "tiny_workers.yaml"


def _search_worker(url: str, study: str, n: int, gpu: int, cache: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SEARCH_CACHE": str(cache),
        "SEARCH_HEARTBEAT_INTERVAL": "1",
        "SEARCH_GRACE_PERIOD": "4",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "search.cli", "worker", "--spec", str(TINY_SPEC), "--tiny"]
    command += ["--device", "cpu", "--storage", url, "--n-trials", str(n)]
    command += ["--study-name", study, "--gpu", str(gpu)]
    # Own session: killing the worker's process group also kills its training child, as
    # stopping a container would.
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.train
def test_search_workers_end_to_end_with_one_killed(pg_url: str, tmp_path: Path) -> None:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    # The victim starts alone: started together, the other two could spend the budget of four
    # tiny trials before it claimed one (seen in CI: "0 trials run by this worker").
    victim = _search_worker(pg_url, name, 4, 0, tmp_path)
    store = create_storage(pg_url, heartbeat_interval=None)
    deadline = time.monotonic() + 240
    running: optuna.trial.FrozenTrial | None = None
    while running is None and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name=name, storage=store)
        except KeyError:
            continue
        mine = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if str(t.user_attrs.get(attrs.WORKER, "")).endswith(f":{victim.pid}")
        ]
        running = mine[0] if mine else None
    if running is None:
        os.killpg(victim.pid, signal.SIGKILL)
        said = victim.communicate(timeout=30)[0]
        raise AssertionError(f"the first worker never ran a trial; it said:\n{said[-3000:]}")
    # Killed at once: a tiny trial is quick, and one the victim finished is its own (GPU 0).
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(10)
    workers = [victim] + [_search_worker(pg_url, name, 4, gpu, tmp_path) for gpu in (1, 2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in workers[1:]]
    assert [proc.returncode for proc in workers[1:]] == [0, 0], outputs
    study = optuna.load_study(study_name=name, storage=store)
    finished = [t for t in study.trials if t.state != TrialState.FAIL]
    assert len(finished) == 4
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in finished)
    assert finished_count(study) == 4
    dead = study.trials[running.number]
    assert dead.state == TrialState.FAIL
    rerun = [t for t in study.trials if t.system_attrs.get("failed_trial") == running.number]
    assert len(rerun) == 1 and rerun[0].params == dead.params
    gpu_of = {str(proc.pid): gpu for proc, gpu in zip(workers, ("0", "1", "2"), strict=True)}
    for trial in finished:  # each trial names the worker and the GPU that ran it
        assert trial.user_attrs[attrs.HOST]
        pid = str(trial.user_attrs[attrs.WORKER]).split(":")[-1]
        assert pid in gpu_of and trial.user_attrs[attrs.GPU] == gpu_of[pid]
    assert any(t.user_attrs[attrs.GPU] in {"1", "2"} for t in finished)
