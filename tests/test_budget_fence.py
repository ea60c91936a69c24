"""The real holder of the budget lock, stopped past the lock timeout, overruns nothing and stalls
no one (real PostgreSQL, real ``search worker`` processes, real SIGSTOP; issue 18).

Three workers share a small budget. The test finds the process that holds the study's budget
lock through ``pg_locks`` joined with ``pg_stat_activity`` (the lock's connection is named
``search <pid>@<host>``; through ``search proxy`` the proxy's lock connection carries its
worker's name), stops it with SIGSTOP while it holds the lock, keeps it stopped well past
``$SEARCH_LOCK_TIMEOUT`` (the server, or the proxy's lease, releases the lock and the others
claim), then lets it go on. The study must end with exactly the budget trained, and no other
worker may wait between two of its trials longer than the lock timeout plus one heartbeat (plus
``SLACK_S`` for the work between a trial's end and the next claim on a loaded machine).

``SEARCH_TEST_FENCE_REPEATS`` (default 2) is how many holders each run stops, one after the
other (the budget grows with it), and the budget must come out exact after all of them; 20 by
hand: ``SEARCH_TEST_FENCE_REPEATS=20 pytest -q -s tests/test_budget_fence.py``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from _cli import search_env
from _cli_workers import WorkerProcess
from _cli_workers import assert_budget_spent_exactly
from _cli_workers import pid_of
from _cli_workers import stop_all
from _cli_workers import study_trials
from _cli_workers import wait_for
from optuna.trial import FrozenTrial
from optuna.trial import TrialState
from sqlalchemy.pool import NullPool

from search.record.counts import spent_count
from storage._lock import lock_key

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]

REPEATS = int(os.environ.get("SEARCH_TEST_FENCE_REPEATS", "2"))
LOCK_TIMEOUT_S = 2.0
HEARTBEAT_S = 1.0
STOP_S = LOCK_TIMEOUT_S + HEARTBEAT_S + 3.0  # long enough that a stall would show
SLACK_S = 1.5  # a trial's end to the next claim (records, the trial child) under load
PER_STOP = 8  # budget per stop: the others keep claiming while one is stopped
ENV = {"SEARCH_LOCK_TIMEOUT": f"{LOCK_TIMEOUT_S:g}", "SEARCH_HEARTBEAT_INTERVAL": "1"}
_LABEL = re.compile(r"^search (\d+)@")


def _holder(conn: sqlalchemy.engine.Connection, name: str) -> int | None:
    """The client pid named by the connection that holds the advisory lock ``name``."""
    key = lock_key(name) & 0xFFFF_FFFF_FFFF_FFFF
    app = conn.execute(
        sqlalchemy.text(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
            " AND l.classid::bigint = :high AND l.objid::bigint = :low"
        ),
        {"high": key >> 32, "low": key & 0xFFFF_FFFF},
    ).scalar()
    conn.rollback()
    found = _LABEL.match(app or "")
    return int(found.group(1)) if found else None


def _stop_the_holder(pg_db: str, study: str, workers: list[WorkerProcess]) -> WorkerProcess:
    """SIGSTOP the worker that holds the budget lock, checked again once it is stopped."""
    by_pid = {w.pid: w for w in workers}
    engine = sqlalchemy.create_engine(pg_db, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                pid = _holder(conn, f"budget:{study}")
                if pid in by_pid:
                    os.kill(pid, signal.SIGSTOP)
                    if _holder(conn, f"budget:{study}") == pid:
                        return by_pid[pid]
                    os.kill(pid, signal.SIGCONT)  # it had let go already
                time.sleep(0.003)
    finally:
        engine.dispose()
    raise AssertionError("never saw a worker hold the budget lock")


def _waits(trials: list[FrozenTrial], worker: WorkerProcess) -> list[tuple[float, float]]:
    """``(end of a trial, seconds to the next claim)`` for each of ``worker``'s trials."""
    mine = sorted(
        (t for t in trials if pid_of(t) == worker.pid and t.datetime_start is not None),
        key=lambda t: t.datetime_start,  # type: ignore[arg-type,return-value]
    )
    return [
        (
            earlier.datetime_complete.timestamp(),
            (later.datetime_start - earlier.datetime_complete).total_seconds(),
        )
        for earlier, later in zip(mine, mine[1:], strict=False)
        if earlier.datetime_complete is not None and later.datetime_start is not None
    ]


def _completed(pg_db: str, study: str) -> int:
    return sum(t.state == TrialState.COMPLETE for t in study_trials(pg_db, study))


def _paused_holders_run(pg_db: str, url: str, tmp: Path, env: dict[str, str]) -> int:
    """Three workers; ``REPEATS`` times, the budget lock's holder stopped past the timeout.

    Returns how many claims a resumed holder found fenced off (it wrote nothing).
    """
    study = f"fence-{uuid.uuid4().hex[:8]}"
    budget = PER_STOP * REPEATS + 2
    workers = [
        WorkerProcess(url, study, budget, tmp, f"{study}-w{i}", epochs=2, epoch_s=0.4, env=env)
        for i in range(3)
    ]
    stops: list[tuple[WorkerProcess, float, float]] = []
    try:
        for _ in range(REPEATS):
            done = _completed(pg_db, study)
            wait_for("a finished trial", lambda done=done: _completed(pg_db, study) > done, 120)
            stopped = _stop_the_holder(pg_db, study, workers)
            since = time.time()
            time.sleep(STOP_S)
            os.kill(stopped.pid, signal.SIGCONT)
            stops.append((stopped, since, time.time()))
            assert spent_count(study_trials(pg_db, study)) <= budget
        for worker in workers:
            worker.assert_exited_cleanly()
        trials = study_trials(pg_db, study)
        assert_budget_spent_exactly(trials, budget, workers)  # not one trained trial more
        bound = LOCK_TIMEOUT_S + HEARTBEAT_S + SLACK_S
        for stopped, since, until in stops:
            for worker in workers:
                if worker is stopped:
                    continue
                for ended, waited in _waits(trials, worker):
                    if since - bound <= ended <= until:  # it wanted a trial while one was stopped
                        assert waited <= bound, f"{worker} waited {waited:.1f} s (> {bound} s)"
        return sum(w.stderr().count("budget lock was taken by another worker") for w in workers)
    finally:
        stop_all(workers)


def test_a_stopped_budget_lock_holder_overruns_nothing_and_stalls_no_one(
    pg_db: str, tmp_path: Path
) -> None:
    fenced = _paused_holders_run(pg_db, pg_db, tmp_path, ENV)
    print(f"direct: {REPEATS} holders stopped, budget exact, {fenced} claims fenced off")


@pytest.fixture
def proxy(pg_db: str, tmp_path: Path) -> Iterator[str]:
    """A ``search proxy`` on the test's database with the short lock timeout (its lease)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    out = tmp_path / "proxy.out"
    with open(out, "w") as stdout, open(tmp_path / "proxy.err", "w") as stderr:
        popen = subprocess.Popen(
            [sys.executable, "-m", "search.cli", "proxy", "--host", "127.0.0.1"]
            + ["--port", str(port)],
            env=search_env({**ENV, "SEARCH_STORAGE": pg_db}),
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        wait_for("the proxy to listen", lambda: "search proxy:" in out.read_text(), 60)
        yield f"grpc://127.0.0.1:{port}"
    finally:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(10)


def test_a_stopped_budget_lock_holder_through_the_proxy_overruns_nothing_and_stalls_no_one(
    pg_db: str, proxy: str, tmp_path: Path
) -> None:
    fenced = _paused_holders_run(pg_db, proxy, tmp_path, ENV)
    print(f"proxy: {REPEATS} holders stopped, budget exact, {fenced} claims fenced off")
