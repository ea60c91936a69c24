"""``search proxy`` and ``--storage grpc://``: real proxy and worker processes on PostgreSQL.

The workers are the real ``search worker`` CLI with its trial child; only the training is
``tests/fixtures/slow_objective.py`` (sleeps and reports each epoch). Heartbeats every
second, a 3-second grace period, as in tests/test_worker_faults.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from _cli import run_search
from _cli_workers import wait_for
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.record import attrs
from search.record.counts import spent_count
from search.worker.budget import RETRY_HISTORY
from storage import StorageError
from storage import create_storage
from storage import named_lock

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed"),
]

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "fixtures" / "tiny_workers.yaml"
ENV = {
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "fixtures")]),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "SEARCH_HEARTBEAT_INTERVAL": "1",
    "SEARCH_GRACE_PERIOD": "3",
    "SEARCH_CONNECT_TIMEOUT": "20",
}
# A process that holds a lock through the proxy until it is killed.
HOLDER = """
import sys, time
from storage import create_storage, named_lock
store = create_storage(sys.argv[1], heartbeat_interval=None)
with named_lock(store, "budget:held"):
    print("held", flush=True)
    time.sleep(600)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    """A process in its own session, its output in files (killing the group kills children)."""

    def __init__(self, args: list[str], tmp: Path, label: str, **env: str) -> None:
        self.out, self.err = tmp / f"{label}.out", tmp / f"{label}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, *args],
                env={**os.environ, **ENV, **env},
                cwd=tmp,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {self.pid} did not exit: {self.stderr()[-2000:]}") from None


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        if proc.popen.poll() is None:
            proc.kill_group()


def _start_proxy(
    procs: list[Proc], tmp: Path, db: str, port: int | None = None, label: str = "proxy"
) -> tuple[Proc, str]:
    port = port or _free_port()
    args = ["-m", "search.cli", "proxy", "--host", "127.0.0.1", "--port", str(port)]
    proxy = Proc(args, tmp, label, SEARCH_STORAGE=db)  # the password stays off argv
    procs.append(proxy)

    def listening() -> bool:
        assert proxy.popen.poll() is None, proxy.stderr()
        return "search proxy:" in proxy.stdout()

    wait_for("the proxy to listen", listening, 60)
    return proxy, f"grpc://127.0.0.1:{port}"


def _trials(db: str, study: str) -> list[FrozenTrial]:
    store = create_storage(db, heartbeat_interval=None)
    try:
        return optuna.load_study(study_name=study, storage=store).get_trials(deepcopy=False)
    except KeyError:
        return []
    finally:
        store.engine.dispose()  # type: ignore[attr-defined]


@pytest.mark.postgres
def test_three_workers_through_the_proxy_spend_the_budget_exactly_with_one_killed(
    pg_db: str, tmp_path: Path, procs: list[Proc]
) -> None:
    proxy, url = _start_proxy(procs, tmp_path, pg_db)
    study, budget = f"proxy-{uuid.uuid4().hex[:8]}", 5
    args = ["-m", "search.cli", "worker", "--spec", str(SPEC), "--device", "cpu", "--tiny"]
    args += ["--n-trials", str(budget), "--study-name", study]
    args += ["--objective", "slow_objective:train"]
    env = {"SEARCH_STORAGE": url, "SEARCH_TEST_EPOCHS": "3", "SEARCH_TEST_EPOCH_S": "0.5"}
    env["SEARCH_CACHE"] = str(tmp_path / "cache")  # tiny replicas, built offline
    workers = [Proc(args, tmp_path, f"w{i}", **env) for i in range(3)]
    procs.extend(workers)
    victim, survivors = workers[0], workers[1:]

    def victim_running() -> FrozenTrial | None:
        assert victim.popen.poll() is None, victim.stderr()
        for trial in _trials(pg_db, study):
            worker = str(trial.user_attrs.get(attrs.WORKER, ""))
            if trial.state == TrialState.RUNNING and worker.endswith(f":{victim.pid}"):
                return trial
        return None

    running = wait_for("a running trial of the victim", victim_running, 120, every=0.1)
    assert isinstance(running, FrozenTrial)
    os.killpg(victim.pid, signal.SIGKILL)  # the worker and its trial child
    victim.popen.wait(10)
    for proc in survivors:
        assert proc.finish() == 0, proc.stderr()[-3000:]
        assert "Traceback" not in proc.stderr(), proc.stderr()
    trials = _trials(pg_db, study)
    assert spent_count(trials) == budget  # exact: nothing RUNNING, nothing spent twice
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert [t.state for t in trials].count(TrialState.COMPLETE) == budget
    dead = next(t for t in trials if t.number == running.number)
    assert dead.state == TrialState.FAIL
    copies = [t for t in trials if running.number in t.system_attrs.get(RETRY_HISTORY, ())]
    assert len(copies) == 1 and copies[0].state == TrialState.COMPLETE
    assert copies[0].params == dead.params
    assert any("failed and re-queued" in p.stderr() for p in survivors)
    for proc in survivors:
        assert url in proc.stdout()  # "study ... in grpc://..."
    proxy.popen.send_signal(signal.SIGTERM)
    assert proxy.finish(30) == 0, proxy.stderr()
    assert "search proxy stopped (SIGTERM)" in proxy.stderr()


@pytest.mark.postgres
def test_a_killed_lock_holder_releases_the_lock_on_the_proxy(
    pg_db: str, tmp_path: Path, procs: list[Proc]
) -> None:
    _, url = _start_proxy(procs, tmp_path, pg_db)
    holder = Proc(["-c", HOLDER, url], tmp_path, "holder")
    procs.append(holder)
    wait_for("the holder to take the lock", lambda: "held" in holder.stdout(), 60)
    store = create_storage(url, heartbeat_interval=None)
    taken = threading.Event()

    def take() -> None:
        with named_lock(store, "budget:held"):
            taken.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    assert not taken.wait(2), "the lock was given while its holder was alive"
    holder.kill_group()
    assert taken.wait(30), "the lock of a killed holder was never released"


def test_an_unreachable_proxy_is_one_line_and_exit_2(tmp_path: Path) -> None:
    url = f"grpc://127.0.0.1:{_free_port()}"  # nothing listens there
    done = run_search(
        "storage",
        "check",
        "--storage",
        url,
        env={**ENV, "SEARCH_CONNECT_TIMEOUT": "1"},
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"cannot reach the storage proxy {url} within 1 s" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_proxy_url_with_a_password_a_proxy_behind_a_proxy_or_a_taken_port_is_refused() -> None:
    with pytest.raises(StorageError, match="holds no user or password") as caught:
        create_storage("grpc://user:s3cret@proxy:13000")
    assert "s3cret" not in str(caught.value)
    from search.cli.proxy import ProxyError
    from search.cli.proxy import serve

    with pytest.raises(ProxyError, match="not a proxy's"):
        serve("grpc://127.0.0.1:1", host="127.0.0.1", port=1, threads=4)
    with socket.socket() as taken:  # a port in use: one line, before any database is opened
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ProxyError, match=f"--port {port}: cannot listen there"):
            serve("sqlite:///nowhere/x.db", host="127.0.0.1", port=port, threads=4)


@pytest.mark.postgres
def test_the_budget_operations_run_by_the_proxy(
    pg_url: str, tmp_path: Path, procs: list[Proc]
) -> None:
    from optuna.exceptions import UpdateFinishedTrialError

    from search.record.trial_record import TrialRecord
    from search.record.trial_record import write_record
    from search.worker.budget import fail_and_requeue
    from search.worker.budget import fail_stale

    _, url = _start_proxy(procs, tmp_path, pg_url)
    store = create_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=store, study_name=f"ops-{uuid.uuid4().hex[:8]}")
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    write_record(store, trial._trial_id, TrialRecord(user={"a": 1}, system={"b": 2}))
    assert store.get_trial(trial._trial_id).user_attrs["a"] == 1
    # One transaction by the proxy: FAIL and a WAITING copy; the second call finds it failed.
    assert fail_and_requeue(study, trial._trial_id, user_attrs={"why": "test"}) is not None
    assert fail_and_requeue(study, trial._trial_id) is None
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    copy = study.get_trials(deepcopy=False)[1]
    assert copy.params == study.trials[0].params and copy.system_attrs[RETRY_HISTORY] == [0]
    # A finished trial refuses a record as it does on the database (the runner relies on it).
    with pytest.raises(UpdateFinishedTrialError):
        write_record(store, trial._trial_id, TrialRecord(user={"late": 1}, system={}))
    # Heartbeats and the stale query go through the proxy.
    running = study.ask()
    store.record_heartbeat(running._trial_id)  # type: ignore[attr-defined]
    assert fail_stale(study) == []
    time.sleep(2.5)  # past the 1 s grace period
    assert fail_stale(study) == [running.number]


def _closing_ports() -> set[int]:
    """Local ports of this host's TCP connections closed on their side and not yet gone
    (FIN-WAIT-1, FIN-WAIT-2, TIME-WAIT: ``/proc/net/tcp*``)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state in ("04", "05", "06"):
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def test_a_killed_proxy_restarted_at_once_on_its_port_serves_within_2_s(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """SIGKILL with a client connected and calling leaves the proxy's side in TIME-WAIT; the
    restarted proxy's port check must not take that for a port in use (it waited 60-86 s)."""
    from optuna.storages import GrpcStorageProxy

    db = f"sqlite:///{tmp_path / 'restart.db'}"
    began = time.monotonic()
    first, url = _start_proxy(procs, tmp_path, db)
    fresh_start_s = time.monotonic() - began  # how long a proxy takes to start at all
    port = int(url.rsplit(":", 1)[1])
    store = create_storage(url, heartbeat_interval=None)
    optuna.create_study(storage=store, study_name="restart")
    answered: list[float] = []  # when each call of the connected client returned
    stop, calling = threading.Event(), threading.Event()

    def calls() -> None:
        while not stop.is_set():
            calling.wait()
            store.get_all_studies()  # retried while the proxy is away
            answered.append(time.monotonic())
            time.sleep(0.02)

    client = threading.Thread(target=calls, daemon=True)
    calling.set()
    client.start()
    try:
        wait_for("the client to call", lambda: len(answered) > 3, 30)
        calling.clear()  # between two calls, still connected: the kill closes cleanly (FIN)
        time.sleep(0.3)
        first.kill_group()  # SIGKILL
        calling.set()  # the client calls on, retrying
        wait_for("the killed proxy's connection closing", lambda: port in _closing_ports(), 10)
        restarted_at = time.monotonic()
        again, _ = _start_proxy(procs, tmp_path, db, port=port, label="restarted")
        listening_s = time.monotonic() - restarted_at
        served = wait_for(
            "the connected client served again",
            lambda: next((t for t in answered if t > restarted_at), None),
            30,
            every=0.01,
        )
    finally:
        stop.set()
        calling.set()
        client.join(130)
    served_s = float(served) - restarted_at  # type: ignore[arg-type]
    # Optuna's own client, new, on the restarted proxy.
    plain = GrpcStorageProxy(host="127.0.0.1", port=port)
    try:
        assert [s.study_name for s in plain.get_all_studies()] == ["restart"]
    finally:
        plain.close()
    print(f"fresh start {fresh_start_s:.2f} s, restart listening {listening_s:.2f} s, "
          f"served {served_s:.2f} s")  # fmt: skip
    assert served_s - listening_s <= 2.0  # the client back within 2 s of the port
    assert served_s <= fresh_start_s + 2.0  # as fast as a fresh start, not 60 s
    again.popen.send_signal(signal.SIGTERM)
    assert again.finish(30) == 0, again.stderr()
