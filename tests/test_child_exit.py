"""A finished trial's child exits while the worker records: waited for before the next child.

The child's exit is slowed for real, by a ``multiprocessing`` finalizer that runs in the
child's own exit (as a CUDA context's teardown or a large heap's unmapping would), and held
until the test releases it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from _factories import trial_config

from search.record.config import TrialConfig
from search.worker import isolation
from search.worker.isolation import reap
from search.worker.isolation import run_isolated
from search.worker.isolation import warm_up

HERE = "test_child_exit"  # the child imports the objectives below by this module name
TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------- objectives (in the child)


def exit_when_released(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    """Return at once; the child's exit waits for ``$EXIT_RELEASE`` (60 s at most).

    Writes its pid to ``$EXIT_PID`` and, once its exit may go on, the time to ``$EXIT_MARK``.
    """
    from multiprocessing import util

    Path(os.environ["EXIT_PID"]).write_text(str(os.getpid()))

    def finish() -> None:
        release, deadline = Path(os.environ["EXIT_RELEASE"]), time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        Path(os.environ["EXIT_MARK"]).write_text(repr(time.monotonic()))

    util.Finalize(None, finish, exitpriority=10)  # runs in the child's exit, after the result
    return {"metrics": {"ndcg@10": 0.5}}


def mark_start(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    """Write the time the objective was called to ``$START_MARK``."""
    Path(os.environ["START_MARK"]).write_text(repr(time.monotonic()))
    return {"metrics": {"ndcg@10": 0.25}}


# ------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module", autouse=True)
def _forkserver() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warm_up(f"{HERE}:mark_start")


@pytest.fixture
def marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("pid", "release", "exit", "start")}
    for env, name in (
        ("EXIT_PID", "pid"),
        ("EXIT_RELEASE", "release"),
        ("EXIT_MARK", "exit"),
        ("START_MARK", "start"),
    ):
        monkeypatch.setenv(env, str(paths[name]))
    return paths


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_result_returns_while_the_child_exits_and_the_next_child_waits_for_it(
    marks: dict[str, Path],
) -> None:
    out = run_isolated(trial_config(), objective=f"{HERE}:exit_when_released")
    assert out.status == "complete" and out.value == 0.5
    assert out.exitcode is None  # not waited for
    pid = int(marks["pid"].read_text())
    assert _alive(pid) and not marks["exit"].exists()  # still in its exit

    marks["release"].write_text("")
    after = run_isolated(trial_config(), objective=f"{HERE}:mark_start")
    assert after.status == "complete" and after.value == 0.25
    # The first child had finished exiting before the second was started.
    assert float(marks["exit"].read_text()) < float(marks["start"].read_text())
    assert not psutil.pid_exists(pid)  # and it was reaped (no zombie left)
    reap()


def test_reap_kills_a_child_that_overstays_its_grace(
    marks: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(isolation, "_EXIT_GRACE_S", 0.5)
    out = run_isolated(trial_config(), objective=f"{HERE}:exit_when_released")
    assert out.status == "complete"
    pid = int(marks["pid"].read_text())
    started = time.monotonic()
    reap()  # never released: killed after the grace
    assert time.monotonic() - started < 10
    assert not psutil.pid_exists(pid)
    assert not marks["exit"].exists()  # its exit never went on: it was killed


def test_a_worker_that_exits_waits_for_its_last_childs_exit(marks: dict[str, Path]) -> None:
    marks["release"].write_text("")  # the exit goes on at once
    script = (
        "from _factories import trial_config\n"
        "from search.worker.isolation import run_isolated\n"
        "if __name__ == '__main__':\n"
        f"    out = run_isolated(trial_config(), objective='{HERE}:exit_when_released')\n"
        "    assert out.status == 'complete', out\n"
    )
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # The child's own exit ran to its end: not SIGTERMed by multiprocessing's exit handler.
    assert marks["exit"].exists()
    assert not psutil.pid_exists(int(marks["pid"].read_text()))
