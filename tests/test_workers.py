"""Many worker processes on one PostgreSQL study: killed workers, a DB restart.

Most workers here are ``tests/fixtures/fake_worker.py``: the service's study/budget/heartbeat
path with ``time.sleep`` for training, so each trial takes a second, not minutes. Signals
(SIGTERM, SIGINT) and the other faults are tested on the real ``search worker`` and ``search
run`` with a live training child in ``tests/test_worker_faults.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy
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
WORKER = ROOT / "tests" / "fixtures" / "fake_worker.py"
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


def _worker(
    url: str, study: str, n: int, seconds: float, name: str, grace: int = 3
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            url,
            study,
            "--n-trials",
            str(n),
            "--seconds",
            str(seconds),
            "--worker",
            name,
            "--heartbeat",
            "1",
            "--grace",
            str(grace),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def _wait_running(proc: subprocess.Popen[str]) -> int:
    """Read the worker's output until it says it is inside a trial; return the trial number."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("running "):
            return int(line.split()[1])
    raise AssertionError("the worker ended without running a trial")


def _summary(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0
    return dict(json.loads(out.strip().splitlines()[-1]))


def _load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=create_storage(url))


def test_a_killed_workers_trial_is_rerun_by_a_survivor(pg_url: str) -> None:
    name = f"kill-{uuid.uuid4().hex[:8]}"
    victim = _worker(pg_url, name, 8, 1.0, "victim")
    number = _wait_running(victim)
    survivors = [_worker(pg_url, name, 8, 1.0, f"s{i}") for i in range(2)]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    for proc in survivors:
        _summary(proc)
    study = _load(pg_url, name)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 8
    assert states.count(TrialState.FAIL) == 1
    assert finished_count(study) == 8
    dead = study.trials[number]
    assert dead.state == TrialState.FAIL
    reruns = [t for t in study.trials if t.system_attrs.get("failed_trial") == number]
    assert len(reruns) == 1
    assert reruns[0].state == TrialState.COMPLETE
    assert reruns[0].params == dead.params
    assert reruns[0].user_attrs[attrs.WORKER] in {"s0", "s1"}


@pytest.mark.pg_restart
def test_workers_ride_out_a_postgres_restart(pg_url: str) -> None:
    tool = shlex.split(PG_RESTART)[0]
    if shutil.which(tool) is None:
        pytest.skip(f"cannot restart PostgreSQL here: {tool} not found (SEARCH_TEST_PG_RESTART)")
    name = f"restart-{uuid.uuid4().hex[:8]}"
    workers = [_worker(pg_url, name, 10, 0.5, f"w{i}", grace=20) for i in range(2)]
    _wait_running(workers[0])
    study = _load(pg_url, name)
    deadline = time.monotonic() + 60
    while finished_count(study) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    restart = subprocess.run(shlex.split(PG_RESTART), capture_output=True, text=True)
    try:
        assert restart.returncode == 0, restart.stderr
        for proc in workers:
            _summary(proc)
    finally:
        deadline = time.monotonic() + 60
        while _reachable(pg_url) is not None and time.monotonic() < deadline:
            time.sleep(0.5)  # leave the server running for whoever comes next
    study = _load(pg_url, name)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 10  # nothing lost, nothing failed or doubled
    assert finished_count(study) == 10


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
    workers = [_search_worker(pg_url, name, 4, gpu, tmp_path) for gpu in range(3)]
    victim = workers[0]
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
    assert running is not None, "the first worker never ran a trial"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(10)
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
    for trial in finished:
        assert trial.user_attrs[attrs.HOST]
        assert trial.user_attrs[attrs.GPU] in {"1", "2"}
        assert str(trial.user_attrs[attrs.WORKER]).split(":")[-1] in {
            str(p.pid) for p in workers[1:]
        }
