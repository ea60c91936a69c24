"""A SIGKILLed worker's trial process dies with it, within a second and without a word; its
forkserver follows.

The worker is the real CLI (``search worker``) with its real forkserver and trial child; the
training is ``tests/fixtures/slow_objective.py``, asleep in a 60-second epoch, so without the
lifeline it would live on for up to a minute, then print a ``BrokenPipeError`` traceback on
its report to the dead worker. Only the worker's own pid is killed (not its process group),
as the kernel's OOM killer or ``kill -9 <pid>`` would. Past the grace period the dead
worker's trial is failed as stale: its outcome is written (``failed``, worker lost).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psutil
import pytest
from _cli_workers import GRACE_S
from _cli_workers import HEARTBEAT_S
from _cli_workers import WorkerProcess
from _cli_workers import stop_all
from _cli_workers import wait_for
from optuna.trial import TrialState

from search.observe.report import study_report
from search.record import attrs
from search.worker.budget import fail_stale
from storage import create_storage

REPEATS = int(os.environ.get("SEARCH_TEST_CHILD_DIES_REPEATS", "1"))


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    stop_all(started)


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its reaper counts as gone: it holds no memory)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("attempt", range(REPEATS))
def test_a_sigkilled_workers_trial_child_dies_within_a_second_quietly(
    tmp_path: Path, workers: list[WorkerProcess], attempt: int
) -> None:
    url = f"sqlite:///{tmp_path}/dies.db"
    worker = WorkerProcess(url, "dies", 1, tmp_path, "w", epochs=1, epoch_s=60)
    workers.append(worker)
    wait_for("the trial child to train", worker.training, 120)
    child = int(next(worker.children.iterdir()).name)
    parent = psutil.Process(worker.pid)
    descendants = parent.children(recursive=True)
    assert child in {p.pid for p in descendants}, descendants
    server = psutil.Process(child).ppid()  # the forkserver (not the worker) forked it
    assert server != worker.pid and server in {p.pid for p in descendants}

    os.kill(worker.pid, signal.SIGKILL)
    killed = time.monotonic()
    worker.popen.wait(10)
    wait_for("the trial child to die", lambda: _gone(child), 5, every=0.01)
    child_s = time.monotonic() - killed
    wait_for("the forkserver to die", lambda: _gone(server), 5, every=0.01)
    server_s = time.monotonic() - killed
    print(f"\ntrial child gone {child_s:.3f} s, forkserver {server_s:.3f} s after the kill")
    assert child_s < 1.0, child_s
    # The forkserver exits on its own pipe from the worker, skipping the interpreter's
    # shutdown (seconds with torch loaded on a busy host: search.worker.forkserver_exit).
    assert server_s < 1.0, server_s
    time.sleep(0.5)  # anything the child would print comes to the worker's stderr file
    err = worker.stderr()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err[-3000:]
    if attempt == 0:
        _the_stale_trial_records_its_outcome(url)


def _the_stale_trial_records_its_outcome(url: str) -> None:
    """Past the grace period the dead worker's trial is failed as stale (what every worker's
    stale watcher calls): its outcome is written, not left ``running``, and the report's row
    adds up."""
    storage = create_storage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    study = optuna.load_study(study_name="dies", storage=storage)
    failed: list[int] = []
    wait_for("the trial to go stale", lambda: failed.extend(fail_stale(study)) or failed, 30)
    lost, copy = sorted(study.get_trials(), key=lambda t: t.number)
    assert lost.state == TrialState.FAIL and copy.state == TrialState.WAITING
    assert lost.user_attrs[attrs.OUTCOME] == attrs.OUTCOME_FAILED, lost.user_attrs
    assert lost.user_attrs[attrs.ERROR] == "worker lost (heartbeat stale)"
    [row] = study_report(study)["models"]
    assert (row["trials"], row["requeued"], row["failed"], row["running"]) == (1, 1, 0, 0)
