"""The real holder of the budget lock, stopped past the lock timeout, overruns nothing and stalls
no one (real PostgreSQL, real ``search worker`` processes, real SIGSTOP; issue 18).

Three workers share a budget of 4: three trials are claimed at once, and the fourth, the last,
is at stake. The test finds the process that holds the study's budget lock to claim it through
``pg_locks`` joined with ``pg_stat_activity`` (the lock's connection is named ``search
<pid>@<host>``; through ``search proxy`` the proxy's lock connection carries its worker's name),
stops it with SIGSTOP while it holds the lock, keeps it stopped well past
``$SEARCH_LOCK_TIMEOUT`` (the server, or the proxy's lease, releases the lock and the others
claim), then lets it go on. The study must end with exactly the budget trained, and no other
worker may wait between two of its trials longer than the lock timeout plus one heartbeat (plus
``SLACK_S`` for the work between a trial's end and the next claim on a loaded machine).

``SEARCH_TEST_FENCE_REPEATS`` (default 2) is how many such runs each test makes; 20 by hand:
``SEARCH_TEST_FENCE_REPEATS=20 pytest -q -s tests/test_budget_fence.py`` (each test prints in
how many runs the holder was caught before the last claim, and how many of those claims were
fenced off when it resumed).
"""

from __future__ import annotations

import json
import os
import random
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
from _cli_workers import storage_of
from _cli_workers import study_trials
from _cli_workers import wait_for
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial
from sqlalchemy.pool import NullPool

from storage._fence import FENCE_KEY
from storage._lock import lock_key

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]

REPEATS = int(os.environ.get("SEARCH_TEST_FENCE_REPEATS", "1"))  # 20 by hand (BENCHMARKS, notes)
LOCK_TIMEOUT_S = 2.0
HEARTBEAT_S = 1.0
STOP_S = LOCK_TIMEOUT_S + HEARTBEAT_S + 3.0  # long enough that a stall would show
SLACK_S = 2.5  # a trial's end to the next claim (records, the trial child) under load:
# 1.5 s failed 2 of 3 runs on the 2-core machine loaded by a bench (5.7 s, 6.1 s stalls), passed 6
# of 6 after it; the stall this guards against grew without bound (47 s)
BUDGET = 4  # three claimed at once, then the last one is at stake
CLAIM_S = 0.5  # at most this long from taking the lock to writing the fence token
AFTER_FENCE_S = 0.1  # the fence token to the claim's commit: 0.05 s idle, 0.25 s under load;
# at 0.2 s most stops came after a quick claim (4 of 12 tests redid too many runs, 2026-12-06)
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


def _claimed(conn: sqlalchemy.engine.Connection, study: str) -> tuple[int, set[int]]:
    """How many trials of ``study`` were claimed (not WAITING), and the pids running one."""
    rows = conn.execute(
        sqlalchemy.text(
            "SELECT t.state, a.value_json FROM trials t JOIN studies s USING (study_id)"
            " LEFT JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = 'worker'"
            " WHERE s.study_name = :study AND t.state <> 'WAITING'"
        ),
        {"study": study},
    ).all()
    conn.rollback()
    running = {int(json.loads(w).rsplit(":", 1)[1]) for st, w in rows if st == "RUNNING" and w}
    return len(rows), running


def _token(conn: sqlalchemy.engine.Connection, study: str) -> str | None:
    """The study's fence token as it stands (``storage._fence``)."""
    query = sqlalchemy.text(
        "SELECT a.value_json FROM study_system_attributes a JOIN studies s USING (study_id)"
        " WHERE s.study_name = :study AND a.key = :key"
    )
    token = conn.execute(query, {"study": study, "key": FENCE_KEY}).scalar()
    conn.rollback()
    return token


def _into_the_claim(conn: sqlalchemy.engine.Connection, study: str, before: str | None) -> None:
    """Wait until the claim's holder has written its fence token (``storage._fence``: its
    sweep, read and write follow), then a random moment more, so a stop lands anywhere from
    its read of the trials to its write. ``before``: the token before this holder took the
    lock (read before the holder was seen: a quick claim writes its token at once)."""
    until = time.monotonic() + CLAIM_S
    while time.monotonic() < until and _token(conn, study) == before:
        pass
    time.sleep(random.uniform(0, AFTER_FENCE_S))


def _stop_the_last_claimer(
    pg_db: str, study: str, budget: int, workers: list[WorkerProcess]
) -> tuple[WorkerProcess, bool] | None:
    """SIGSTOP the worker holding the budget lock, once ``budget - 1`` trials are claimed.

    One that is running a trial holds it for its stale sweep, not to claim: the test waits for
    one that claims (no trial of its own running), so the last trial of the budget is at
    stake, and stops it at a random point of its claim (``_into_the_claim``). Returns the
    stopped worker and whether it was caught before the last claim; ``None`` when the last
    claim slipped by and the workers were done before one could be stopped.
    """
    by_pid = {w.pid: w for w in workers}
    storage_of(pg_db)  # the tables, before the workers make them
    engine = sqlalchemy.create_engine(pg_db, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            lock = f"budget:{study}"
            deadline = time.monotonic() + 300  # the workers' start, on a loaded machine
            while _claimed(conn, study)[0] < budget - 1:
                assert time.monotonic() < deadline, "the workers never claimed their trials"
                time.sleep(0.01)
            deadline = time.monotonic() + 60
            token = _token(conn, study)
            while time.monotonic() < deadline and any(w.alive() for w in workers):
                pid = _holder(conn, lock)
                if pid in by_pid and pid not in _claimed(conn, study)[1]:
                    _into_the_claim(conn, study, token)
                    os.kill(pid, signal.SIGSTOP)
                    claimed, running = _claimed(conn, study)
                    if _holder(conn, lock) == pid and pid not in running:
                        return by_pid[pid], claimed == budget - 1
                    os.kill(pid, signal.SIGCONT)  # a sweep, or it had let go already
                token = _token(conn, study)
                time.sleep(0.002)
            claimed = _claimed(conn, study)[0]
    finally:
        engine.dispose()
    assert claimed >= budget, f"no worker took the budget lock to claim ({claimed} claimed)"
    return None  # the last claim slipped by and every worker is done: nothing was stopped


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


def _paused_holder_run(
    pg_db: str, url: str, tmp: Path, env: dict[str, str]
) -> tuple[bool, bool] | None:
    """Three workers on a budget of 4; the holder of the lock for the last claim is stopped
    past the lock timeout, then let go. Returns whether it was caught before the last claim
    and whether its claim, when it resumed, was fenced off; ``None`` if none was stopped."""
    study = f"fence-{uuid.uuid4().hex[:8]}"
    workers = [
        WorkerProcess(url, study, BUDGET, tmp, f"{study}-w{i}", epochs=2, epoch_s=0.4, env=env)
        for i in range(3)
    ]
    try:
        caught = _stop_the_last_claimer(pg_db, study, BUDGET, workers)
        if caught is None:
            return None
        stopped, last = caught
        since = time.time()
        time.sleep(STOP_S)
        os.kill(stopped.pid, signal.SIGCONT)
        until = time.time()
        for worker in workers:
            worker.assert_exited_cleanly()
        trials = study_trials(pg_db, study)
        bound = LOCK_TIMEOUT_S + HEARTBEAT_S + SLACK_S
        for worker in workers:
            for ended, waited in _waits(trials, worker):
                if worker is not stopped and since - bound <= ended <= until:
                    stalled = waited - max(0.0, since - ended)  # from the stop, if it was later
                    assert stalled <= bound, f"{worker} stalled {stalled:.1f} s (> {bound} s)"
        assert_budget_spent_exactly(trials, BUDGET, workers)  # not one trained trial more
        return last, "budget lock was taken by another worker" in stopped.stderr()
    finally:
        stop_all(workers)


def _runs(pg_db: str, url: str, tmp: Path, how: str) -> None:
    """``REPEATS`` runs in which a holder was stopped (a run where none could be is redone)."""
    outcomes: list[tuple[bool, bool]] = []
    redone = 0
    while len(outcomes) < REPEATS:
        outcome = _paused_holder_run(pg_db, url, tmp, ENV)
        if outcome is None:
            redone += 1
            # nothing could be stopped (the last claim was quicker than the poll): not evidence,
            # redone; bounded, so a poll that never catches a holder fails
            assert redone <= 2 * REPEATS + 2, "the last claim slipped by in too many runs"
        else:
            outcomes.append(outcome)
    last = sum(o[0] for o in outcomes)
    fenced = sum(o[1] for o in outcomes)
    print(
        f"{how}: {REPEATS}/{REPEATS} runs exact and unstalled ({redone} redone: nothing stopped); "
        f"holder caught before the last claim in {last}, its claim fenced off in {fenced}"
    )


def test_a_stopped_budget_lock_holder_overruns_nothing_and_stalls_no_one(
    pg_db: str, tmp_path: Path
) -> None:
    _runs(pg_db, pg_db, tmp_path, "direct")


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
    _runs(pg_db, proxy, tmp_path, "proxy")


# Opens the storage as a worker does and stops in the middle of a trial's creation: the study's
# row locked (as every trial creation locks it) in a transaction left open.
MID_TRANSACTION = """
import sys, time, sqlalchemy
from storage import create_storage
storage = create_storage(sys.argv[1], heartbeat_interval=None)
with storage.engine.connect() as conn:
    conn.execute(sqlalchemy.text("SELECT 1 FROM studies WHERE study_id = :s FOR UPDATE"),
                 {"s": int(sys.argv[2])})
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_worker_stopped_inside_a_transaction_stalls_trial_creation_for_the_lock_timeout_only(
    pg_db: str,
) -> None:
    """Why one stopped holder stalled every worker for 47 s (issue 18): it was stopped inside a
    transaction of another connection than the lock's, holding the study's row lock, which
    every trial creation takes; the server ended only the lock's idle transaction. Now every
    connection bounds its idle transactions by the lock timeout."""
    storage = storage_of(pg_db)
    study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "stalled")
    holder = subprocess.Popen(
        [sys.executable, "-c", MID_TRANSACTION, pg_db, str(study_id)],
        stdout=subprocess.PIPE,
        text=True,
        env=search_env(ENV),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGSTOP)
        started = time.monotonic()
        storage.create_new_trial(study_id)  # waits for the study's row
        waited = time.monotonic() - started
        assert waited <= LOCK_TIMEOUT_S + HEARTBEAT_S, f"trial creation stalled {waited:.1f} s"
        assert holder.poll() is None  # still stopped: the server ended its transaction
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait(30)
