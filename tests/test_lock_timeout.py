"""A paused holder of the budget lock does not stall every other worker (real PostgreSQL).

A process takes a named lock and is then SIGSTOPped while holding it, as a worker paused by
its VM or cut off by a partition would be; another process must get the lock once the server
ends the holder's idle transaction (``$SEARCH_LOCK_TIMEOUT``), not when the holder comes back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

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
TAKE = textwrap.dedent(
    """
    import sys, time
    from storage import create_storage, named_lock
    storage = create_storage(sys.argv[1], heartbeat_interval=None)
    started = time.monotonic()
    with named_lock(storage, sys.argv[2]):
        print(f"took {time.monotonic() - started:.2f}", flush=True)
    """
)


def _python(code: str, *args: str, timeout_s: str) -> subprocess.Popen[str]:
    env = {**os.environ, "SEARCH_LOCK_TIMEOUT": timeout_s, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_paused_lock_holder_is_cut_off_after_the_lock_timeout(pg_url: str) -> None:
    name = f"budget:paused-{uuid.uuid4().hex[:8]}"
    # 6 s: well past the taker's own start (interpreter, imports, connection: 1-2 s here), so
    # the taker provably waits on the stopped holder before the server cuts it off.
    holder = _python(HOLD, pg_url, name, timeout_s="6")
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()  # type: ignore[union-attr]
        os.kill(holder.pid, signal.SIGSTOP)
        taker = _python(TAKE, pg_url, name, timeout_s="2")
        out, err = taker.communicate(timeout=60)
        assert taker.returncode == 0, err
        waited = float(out.split()[1])
        # The holder is still stopped: only the server's idle-in-transaction cut released it.
        assert holder.poll() is None
        assert 1.0 <= waited < 20.0, f"took the lock after {waited:.2f} s"
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait(30)


def test_a_bad_lock_timeout_is_one_line(pg_url: str) -> None:
    taker = _python(TAKE, pg_url, f"budget:bad-{uuid.uuid4().hex[:8]}", timeout_s="soon")
    _, err = taker.communicate(timeout=60)
    assert taker.returncode != 0
    assert "$SEARCH_LOCK_TIMEOUT must be a positive number of seconds, not 'soon'" in err
