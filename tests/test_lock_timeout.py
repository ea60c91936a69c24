"""A paused holder of the budget lock does not stall every other worker (real PostgreSQL).

A process takes a named lock and is then SIGSTOPped while holding it, as a worker paused by
its VM or cut off by a partition would be; another process, seen waiting for the lock in
``pg_locks``, must get it once the server ends the holder's idle transaction
(``$SEARCH_LOCK_TIMEOUT``), while the holder is still stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.pool import NullPool

from storage._lock import lock_key

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[1]

HOLD = textwrap.dedent(
    """
    import sys, time
    from storage import create_storage, named_lock
    storage = create_storage(sys.argv[1], heartbeat_interval=None)
    with named_lock(storage, sys.argv[2]):
        print("held", flush=True)
        time.sleep(600)
    """
)
# Ready (imports, storage) before the lock is held; asks for it when told to on stdin.
TAKE = textwrap.dedent(
    """
    import sys
    from storage import create_storage, named_lock
    storage = create_storage(sys.argv[1], heartbeat_interval=None)
    print("ready", flush=True)
    sys.stdin.readline()
    with named_lock(storage, sys.argv[2]):
        print("took", flush=True)
    """
)


def _python(code: str, *args: str, timeout_s: str) -> subprocess.Popen[str]:
    env = {**os.environ, "SEARCH_LOCK_TIMEOUT": timeout_s, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _waiting_for(pg_url: str, name: str, taker: subprocess.Popen[str]) -> bool:
    """Whether a session is seen waiting for the advisory lock ``name`` before ``taker`` ends
    (it waits on the stopped holder until the server cuts the holder off)."""
    key = lock_key(name) & 0xFFFF_FFFF_FFFF_FFFF  # pg_locks: high word classid, low word objid
    waiting = sqlalchemy.text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND classid::bigint = :high AND objid::bigint = :low AND objsubid = 1"
    )
    engine = sqlalchemy.create_engine(pg_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            deadline = time.monotonic() + 60
            while taker.poll() is None and time.monotonic() < deadline:
                if conn.execute(waiting, {"high": key >> 32, "low": key & 0xFFFF_FFFF}).scalar():
                    return True
                conn.rollback()
                time.sleep(0.02)
        return False
    finally:
        engine.dispose()


def test_a_paused_lock_holder_is_cut_off_after_the_lock_timeout(pg_url: str) -> None:
    name = f"budget:paused-{uuid.uuid4().hex[:8]}"
    taker = _python(TAKE, pg_url, name, timeout_s="2")
    assert taker.stdout is not None and taker.stdin is not None
    assert taker.stdout.readline().strip() == "ready", taker.stderr.read()  # type: ignore[union-attr]
    # 6 s of the holder's silence: time enough to see the taker wait in pg_locks.
    holder = _python(HOLD, pg_url, name, timeout_s="6")
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()  # type: ignore[union-attr]
        os.kill(holder.pid, signal.SIGSTOP)
        taker.stdin.write("take\n")
        taker.stdin.flush()
        assert _waiting_for(pg_url, name, taker), "the taker never waited for the held lock"
        out, err = taker.communicate(timeout=60)
        assert taker.returncode == 0, err
        assert out.split() == ["took"]
        # The holder is still stopped: only the server's idle-in-transaction cut released it.
        assert holder.poll() is None
    finally:
        taker.kill()
        taker.wait(30)
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait(30)


def test_a_bad_lock_timeout_is_one_line(pg_url: str) -> None:
    taker = _python(TAKE, pg_url, f"budget:bad-{uuid.uuid4().hex[:8]}", timeout_s="soon")
    _, err = taker.communicate("take\n", timeout=60)
    assert taker.returncode != 0
    assert "$SEARCH_LOCK_TIMEOUT must be a positive number of seconds, not 'soon'" in err
