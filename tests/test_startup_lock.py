"""A stopped holder of the startup lock delays other commands by the lock timeout at most, and
is named (real PostgreSQL, real processes, real SIGSTOP; issue 18).

Every command on PostgreSQL takes the startup (schema) advisory lock while it opens the storage
(``storage._create``). The holder here takes it with the product's own lock code and then sits
on it, stopped, as a process paused in the middle of its start would: the server ends its
transaction after ``$SEARCH_LOCK_TIMEOUT`` of silence, so ``search report`` finishes, having
named the holder (pid and ``application_name``) on stderr while it waited. A holder that does not
bound its silence (an older version, a psql session holding it) makes the waiter give up with
one line, exit 2, naming it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _cli import run_search
from _cli import search_env

from storage._create import SCHEMA_LOCK
from storage._lock import STARTUP_REPORT_S
from storage._lock import STARTUP_SLACK_S
from storage._lock import lock_key

pytestmark = pytest.mark.postgres

# Holds the startup lock as a command does while it opens the storage, until it is killed.
HOLD = textwrap.dedent(
    """
    import sys, time
    from storage._create import _schema_lock, bounded_idle_options, engine_kwargs_for
    kwargs = engine_kwargs_for("postgresql")
    kwargs["connect_args"]["options"] = bounded_idle_options(sys.argv[1])
    with _schema_lock(sys.argv[1], "postgresql", None, kwargs, 10.0, "the test database"):
        print("held", flush=True)
        time.sleep(600)
    """
)
# Holds it as a session lock with no bound on its silence (an older version, a psql session).
HOLD_UNBOUNDED = textwrap.dedent(
    """
    import sys, time, sqlalchemy
    engine = sqlalchemy.create_engine(sys.argv[1])
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SET application_name = 'an old search'"))
        conn.execute(sqlalchemy.select(sqlalchemy.func.pg_advisory_lock(int(sys.argv[2]))))
        conn.commit()
        print("held", flush=True)
        time.sleep(600)
    """
)


def _holder(code: str, *args: str, lock_timeout_s: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=search_env({"SEARCH_LOCK_TIMEOUT": f"{lock_timeout_s:g}"}),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "held", proc.stderr.read() if proc.stderr else line
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


def _report(
    pg_db: str, tmp: Path, lock_timeout_s: float
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = run_search(
        "report", "--study", "nope", "--storage", pg_db, cwd=tmp,
        env={"SEARCH_LOCK_TIMEOUT": f"{lock_timeout_s:g}"}, timeout=120,
    )  # fmt: skip
    return done, time.monotonic() - started


def _end(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait(30)


def test_a_stopped_startup_lock_holder_is_named_and_cut_off_after_the_lock_timeout(
    pg_db: str, tmp_path: Path
) -> None:
    timeout_s = STARTUP_REPORT_S + 7  # the waiter (slow to start) names it before the cut
    baseline, alone = _report(pg_db, tmp_path, timeout_s)  # also creates the tables
    assert baseline.returncode == 2, baseline.stderr
    holder = _holder(HOLD, pg_db, lock_timeout_s=timeout_s)
    try:
        done, took = _report(pg_db, tmp_path, timeout_s)
        # It went on once the server ended the stopped holder's transaction.
        assert done.returncode == 2, done.stderr
        assert baseline.stderr.strip().splitlines()[-1] in done.stderr  # no such study
        assert took - alone <= timeout_s + STARTUP_SLACK_S, (took, alone, done.stderr)
        waiting = [line for line in done.stderr.splitlines() if "startup lock" in line]
        assert len(waiting) == 1, done.stderr
        assert f"search {holder.pid}@" in waiting[0], waiting[0]  # the stopped process, named
        assert "Traceback" not in done.stderr
        assert holder.poll() is None  # still stopped: the server's cut, not its exit
    finally:
        _end(holder)


def test_a_holder_that_never_lets_go_is_one_line_and_exit_2(pg_db: str, tmp_path: Path) -> None:
    timeout_s = 2.0
    baseline, alone = _report(pg_db, tmp_path, timeout_s)
    holder = _holder(HOLD_UNBOUNDED, pg_db, str(lock_key(SCHEMA_LOCK)), lock_timeout_s=60)
    try:
        done, took = _report(pg_db, tmp_path, timeout_s)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("error: the startup lock of "), done.stderr
        assert "an old search" in lines[-1] and "$SEARCH_LOCK_TIMEOUT=2 s" in lines[-1]
        assert "Traceback" not in done.stderr
        assert took - alone <= timeout_s + STARTUP_SLACK_S + STARTUP_REPORT_S, (took, alone)
    finally:
        _end(holder)
